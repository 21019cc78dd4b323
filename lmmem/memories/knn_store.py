"""A kNN-LM datastore on disk: staged, resumable writing and checked opening.

Layout of a datastore folder ``DS``::

    keys.f16       count × dim float16, row-major (a memmap: never loaded whole)
    values.i32     count int32 (the token that followed each key)
    index.faiss    the IVFPQ index (absent for Flat: the keys are the index)
    manifest.json  written last: what the keys are (fingerprints, key source, dim, count), how
                   they were built, and the index; its presence marks a complete datastore

Nothing lost (the project's rule for every folder it writes):

* A build is written into ``.DS.staging`` beside ``DS`` while holding the lock ``.DS.lock``
  (:class:`lmmem.safety.FolderLock`, dropped by the kernel when the process dies) and swapped in
  by :func:`lmmem.safety.swap_in_folder` only when complete, so ``DS`` holds the previous complete
  datastore or nothing, whatever moment the build is killed.
* Rows are *committed* (files flushed and fsynced, then ``build.json``'s ``rows_done`` replaced
  atomically) every ``commit_rows`` rows and at :meth:`DatastoreWriter.finish`. A resumed build
  truncates both files to the committed count, so a chunk cut short (keys written, values not, or
  half a row) is simply written again; the caller skips ``rows_done`` rows of its stream.
* :meth:`Datastore.open` refuses a staging folder or a folder without ``manifest.json`` (a
  half-built datastore), and files whose size does not match the manifest (truncated, corrupted).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.jsonio import dumps, write_json
from lmmem.memories import knn_index
from lmmem.progress import Progress
from lmmem.safety import (
    FolderLock, check_writable_folder, describe_os_error, recover_swap, remove_stale_temp_files, swap_in_folder)

FORMAT_VERSION = 1
KEYS_FILE, VALUES_FILE, INDEX_FILE, MANIFEST_FILE, BUILD_FILE = (
    "keys.f16", "values.i32", "index.faiss", "manifest.json", "build.json")
DATASTORE_FILES = (KEYS_FILE, VALUES_FILE, INDEX_FILE, MANIFEST_FILE, BUILD_FILE)
IDENTITY_KEYS = ("model_fingerprint", "tokenizer_fingerprint", "key_source")  # copied from `info` to the top level
FP16_MAX = 65504.0  # keys beyond it become inf in fp16
COMMIT_BYTES = 256 << 20  # rows are fsynced and committed about every 256 MB of keys
BUILD_COMMAND = "lmmem datastore MODEL --data SOURCE --split train --out {out}"


def staging_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.staging")


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def rebuild_hint(path: Path, info: dict | None = None) -> str:
    command = (info or {}).get("command") or BUILD_COMMAND.format(out=path)
    return f"`{command}`"


def _os_error(e: OSError, out: Path, rows: int) -> LmmemError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return LmmemError(f"no space left on {out.parent} while writing the datastore {out} ({rows:,} rows kept in "
                          f"{staging_path(out).name}); free some space and run the same build again: it resumes")
    return LmmemError(describe_os_error(e, out))


class DatastoreWriter:
    """Staged, resumable writer of a datastore at ``out`` (see the module docstring).

    Args:
        out: the datastore folder to create (or, with ``overwrite``, replace).
        dim: key width. info: what the keys are and how they are made (JSON); a resumed build must
            pass the same ``info`` (and ``dim``). Stored under ``manifest["built"]``, and its
            ``model_fingerprint``, ``tokenizer_fingerprint`` and ``key_source`` also at the top.
            An ``info["command"]`` is named in messages about resuming or rebuilding.
        expected_rows: rows the build will append (progress, a free-space check up front, and
            :meth:`finish` refuses a different count).
        resume: continue a staging folder left by an interrupted build of the same ``dim``/``info``
            (``False``: discard it and start over).
        overwrite: replace a complete datastore already at ``out`` (only when :meth:`finish` swaps).
        progress: progress lines/bar (:class:`lmmem.progress.Progress`). commit_rows: rows between
            commits (default: about 256 MB of keys).
    """

    def __init__(self, out, *, dim: int, info: dict, expected_rows: int | None = None, resume: bool = True,
                 overwrite: bool = False, progress: bool = True, commit_rows: int | None = None):
        out = Path(out)
        self.out = out.resolve() if out.is_symlink() else out
        if dim < 1:
            raise LmmemError(f"the key width must be positive, got dim={dim}")
        self.dim, self.expected_rows = int(dim), expected_rows
        self.info = json.loads(dumps(info, what="the datastore info"))  # as it will read back from JSON
        self.commit_rows = commit_rows or max(1, COMMIT_BYTES // (2 * self.dim))
        self.staging = staging_path(self.out)
        self._files: tuple | None = None
        self._progress: Progress | None = None
        self._t_commit = time.monotonic()
        check_writable_folder(self.out)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FolderLock(lock_path(self.out), f"datastore {self.out}")
        except OSError as e:
            raise _os_error(e, self.out, 0) from None
        try:
            self._open_staging(resume, overwrite)
        except OSError as e:
            self._lock.release()
            raise _os_error(e, self.out, 0) from None
        except BaseException:
            self._lock.release()
            raise
        self._progress = Progress(expected_rows, "datastore", unit="row", initial=self.rows_done, enabled=progress)

    # -- the staging folder -------------------------------------------------------------------------
    def _open_staging(self, resume: bool, overwrite: bool) -> None:
        recover_swap(self.out)  # a swap cut short by a crash: the previous datastore goes back first
        self._check_destination(overwrite)
        state = self._read_state() if resume else None
        if state is not None:
            self._check_same_build(state)
        elif self.staging.exists():
            shutil.rmtree(self.staging)  # discarded on request, or killed before its first commit
        if state is None:
            self.staging.mkdir()
            state = {"format_version": FORMAT_VERSION, "dim": self.dim, "info": self.info, "rows_done": 0,
                     "append_seconds": 0.0, "sessions": 0}
        else:  # killed inside finish() or mid-write: redo the manifest, drop half-written temporaries
            (self.staging / MANIFEST_FILE).unlink(missing_ok=True)
            remove_stale_temp_files(self.staging, (".*.tmp",))
        state["sessions"] += 1
        self._state = state
        self.rows_done = int(state["rows_done"])
        self._committed = self.rows_done
        keys, values = self.staging / KEYS_FILE, self.staging / VALUES_FILE
        for path, width in ((keys, 2 * self.dim), (values, 4)):
            size = path.stat().st_size if path.exists() else 0
            if size < self.rows_done * width:
                raise LmmemError(f"the half-built datastore {self.staging} is damaged ({path.name} holds fewer rows than "
                                 "committed); start over with resume=False (the CLI's --no-resume)")
        self._check_free_space()
        self._files = (open(keys, "ab"), open(values, "ab"))
        for f, width in zip(self._files, (2 * self.dim, 4)):
            f.truncate(self.rows_done * width)  # drop what a killed build wrote after its last commit
            f.seek(self.rows_done * width)
        self._commit()

    def _check_destination(self, overwrite: bool) -> None:
        if not self.out.exists():
            return
        if not self.out.is_dir():
            raise LmmemError(f"{self.out} is a file; give a folder for the datastore")
        foreign = sorted(p.name for p in self.out.iterdir() if p.name not in DATASTORE_FILES)
        if foreign:
            raise LmmemError(f"{self.out} holds files that are not part of a datastore ({', '.join(foreign[:3])}); "
                             "they would be lost: choose a new or empty folder")
        if (self.out / MANIFEST_FILE).exists() and not overwrite:
            raise LmmemError(f"{self.out} already holds a datastore; choose another --out, or pass overwrite=True "
                             "(the CLI's --overwrite) to replace it once the new one is complete")

    def _read_state(self) -> dict | None:
        try:
            state = json.loads((self.staging / BUILD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # no staging folder, or killed before its first commit: nothing to keep
        return state if isinstance(state, dict) and state.get("format_version") == FORMAT_VERSION else None

    def _check_same_build(self, state: dict) -> None:
        diffs = [k for k in sorted(set(state.get("info", {})) | set(self.info))
                 if state.get("info", {}).get(k) != self.info.get(k)]
        if state.get("dim") != self.dim:
            diffs.insert(0, f"dim {state.get('dim')} vs {self.dim}")
        if diffs:
            raise LmmemError(f"{self.staging} holds a half-built datastore of another build (differs in "
                             f"{', '.join(diffs[:3])}); resume it with the same settings, or start over with "
                             "resume=False (the CLI's --no-resume)")

    def _check_free_space(self) -> None:
        if self.expected_rows is None:
            return
        need = max(self.expected_rows - self.rows_done, 0) * (2 * self.dim + 4 + 72)  # keys, values, ~index codes
        free = shutil.disk_usage(self.staging).free
        if need > free:
            raise LmmemError(f"the datastore needs about {need / 2**30:.1f} GiB but {self.out.parent} has "
                             f"{free / 2**30:.1f} GiB free; free some space or choose another --out")

    def _commit(self) -> None:
        """Make every row written so far durable, then record the count (the resume point)."""
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
        now = time.monotonic()
        self._state["rows_done"] = self.rows_done
        self._state["append_seconds"] = round(self._state["append_seconds"] + now - self._t_commit, 3)
        self._t_commit = now
        write_json(self._state, self.staging / BUILD_FILE, what="the datastore build state")
        self._committed = self.rows_done

    # -- the interface ------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows: ``keys`` (n, dim) of any float dtype (stored as fp16), ``values`` (n,) token ids."""
        if self._files is None:
            raise LmmemError("this datastore writer is closed; open a new DatastoreWriter to resume the build")
        k16, v32 = self._check_rows(keys, values)
        try:
            self._files[0].write(k16.numpy().data)
            self._files[1].write(v32.numpy().data)
            self.rows_done += len(v32)
            if self.rows_done - self._committed >= self.commit_rows:
                self._commit()
        except OSError as e:
            self.close()
            raise _os_error(e, self.out, self._committed) from None
        self._progress.update(len(v32))

    def _check_rows(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise LmmemError(f"datastore keys must be (n, {self.dim}); got {tuple(keys.shape)}")
        if values.dim() != 1 or values.shape[0] != keys.shape[0]:
            raise LmmemError(f"datastore values must be ({keys.shape[0]},), one token id per key; got {tuple(values.shape)}")
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise LmmemError(f"datastore values must be integer token ids, got {values.dtype}")
        if self.expected_rows is not None and self.rows_done + len(values) > self.expected_rows:
            raise LmmemError(f"more rows appended than the {self.expected_rows:,} expected_rows this build declared")
        keys = keys.detach()
        low, high = torch.aminmax(keys) if keys.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        # (one reduction in the input's dtype: fp16 elementwise checks are slow on CPU; NaN fails both)
        if not (bool(low >= -FP16_MAX) and bool(high <= FP16_MAX)):
            raise LmmemError("datastore keys hold NaN or values beyond fp16's range (|x| > 65504); the model's "
                             "hidden states are not usable as fp16 keys")
        k16 = keys.to("cpu", torch.float16).contiguous()
        v = values.detach().to("cpu")
        if len(v) and (int(v.min()) < 0 or int(v.max()) >= 2**31):
            raise LmmemError(f"datastore values must be token ids in [0, 2^31); got {int(v.min())}..{int(v.max())}")
        return k16, v.to(torch.int32).contiguous()

    def finish(self, index: str = "auto", *, info: dict | None = None, target_recall: float | None = 0.9,
               recall_ks: tuple = knn_index.CALIBRATION_KS, **index_options) -> Path:
        """Commit, build the index (``"flat"``, ``"ivfpq"`` or ``"auto"``: Flat while
        ``rows × dim ≤ knn_index.FLAT_MAX_MACS``), write the manifest last, swap the folder in.
        ``info``: more to record under ``built`` (e.g. tokens, seconds). ``index_options``: those of
        :func:`knn_index.ivfpq_params` (nlist, m, nbits, train_rows, nprobe, seed). An IVFPQ index's
        default ``nprobe`` and ``rerank`` are calibrated to find ``target_recall`` of the exact
        top-k for every k in ``recall_ks`` (:func:`knn_index.calibrate`; ``None``: keep ``nprobe``)."""
        if self._files is None:
            raise LmmemError("this datastore writer is closed; open a new DatastoreWriter to resume the build")
        if self.rows_done == 0:
            raise LmmemError(f"no rows were appended to the datastore {self.out}; give it some text")
        if self.expected_rows is not None and self.rows_done != self.expected_rows:
            raise LmmemError(f"the datastore build declared {self.expected_rows:,} rows but {self.rows_done:,} were "
                             "appended; the text stream ended early or the count was wrong")
        try:
            self._commit()
            self._progress.close()
            for f in self._files:
                f.close()
            self._files = None
            record = self._build_index(index, index_options, target_recall, recall_ks)
            write_json(self._manifest(record, info), self.staging / MANIFEST_FILE, what="the datastore manifest")
            swap_in_folder(self.staging, self.out)
            (self.out / BUILD_FILE).unlink(missing_ok=True)
        except OSError as e:
            raise _os_error(e, self.out, self._committed) from None
        finally:
            self.close()
        return self.out

    def _build_index(self, index: str, options: dict, target_recall: float | None, recall_ks) -> dict:
        if index not in ("auto", "flat", "ivfpq"):
            raise LmmemError(f"unknown datastore index {index!r}; choose auto, flat or ivfpq")
        count = self.rows_done
        if index == "auto":
            index = "flat" if count * self.dim <= knn_index.FLAT_MAX_MACS else "ivfpq"
            if index == "ivfpq" and knn_index.faiss_or_none() is None:
                warnings.warn(f"faiss is not installed, so the datastore's {count:,} keys get no IVFPQ index and will be "
                              "searched exactly (slow at this size); pip install faiss-cpu and rebuild for one",
                              knn_index.FaissMissingWarning, stacklevel=3)
                index = "flat"
        (self.staging / INDEX_FILE).unlink(missing_ok=True)
        if index == "flat":
            return knn_index.flat_record()
        keys = np.memmap(self.staging / KEYS_FILE, dtype=np.float16, mode="r", shape=(count, self.dim))
        params = knn_index.ivfpq_params(count, self.dim, **options)
        built, record = knn_index.build_ivfpq(keys, params, progress=self._progress.enabled)
        record["rerank"] = 1
        if target_recall is not None:
            if self._progress.enabled:
                print(f"datastore: calibrating nprobe and re-ranking for recall ≥ {target_recall} at k "
                      f"{', '.join(map(str, recall_ks))} against exact search", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            calibration = knn_index.calibrate(built, keys, target=target_recall, ks=recall_ks, seed=params.seed)
            calibration["seconds"] = round(time.perf_counter() - t0, 3)
            record.update(nprobe=calibration["nprobe"], rerank=calibration["rerank"], calibration=calibration)
            short = {k: v["recall"] for k, v in calibration["by_k"].items() if not v["met"]}
            if short:
                warnings.warn(f"the datastore's IVFPQ index finds at most {min(short.values()):.2f} of the exact "
                              f"neighbours at k {', '.join(short)} (target {target_recall}) at any nprobe and re-ranking "
                              "depth; consider index='flat' or a smaller k", knn_index.RecallWarning, stacklevel=3)
        del keys
        knn_index.faiss_or_none().write_index(built, str(self.staging / INDEX_FILE))
        record["file"] = INDEX_FILE
        return record

    def _manifest(self, index_record: dict, more: dict | None) -> dict:
        import lmmem

        built = {**self.info, **json.loads(dumps(more or {}, what="the datastore info"))}
        return {
            "format_version": FORMAT_VERSION,
            **{k: self.info.get(k) for k in IDENTITY_KEYS},
            "dim": self.dim, "count": self.rows_done, "key_dtype": "float16", "value_dtype": "int32",
            "files": {"keys": KEYS_FILE, "values": VALUES_FILE},
            "built": built,
            "index": index_record,
            "writer": {"lmmem_version": getattr(lmmem, "__version__", None), "torch_version": torch.__version__,
                       "search": index_record.get("faiss_version") or "torch-exact",
                       "append_seconds": self._state["append_seconds"], "sessions": self._state["sessions"]},
        }

    def close(self) -> None:
        """Release the files and the lock without finishing (the staging folder stays for a resume)."""
        if self._files is not None:
            for f in self._files:
                try:
                    f.close()
                except OSError:
                    pass
            self._files = None
        if self._progress is not None:
            self._progress.close()
        self._lock.release()

    def __enter__(self) -> "DatastoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
