"""Glyph images for one-shot / rare-class experiments, offline.

* :func:`make_glyphs` — a procedural stand-in for Omniglot: every class is a few random strokes
  (smooth random polylines), every sample re-draws them with per-point jitter, a random rotation,
  scale and shift, and pixel noise. Deterministic from the seed: sample ``j`` of class ``c`` depends
  only on ``(seed, c, j)``, so a larger request extends a smaller one. numpy + torch, vectorised;
  a few thousand 28×28 images take well under a second.
* :func:`load_omniglot` — the real thing through Hugging Face ``datasets`` (``load_dataset`` on a hub
  name or a local folder / parquet file) for users with network access, returning the same
  ``(images, labels)`` layout, so the curriculum runs unchanged on it.

Images are float32 ``(N, 1, S, S)`` in ``[0, 1]`` with ink = 1 (Omniglot's black-on-white is
inverted), labels int64 ``0 .. C-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmmem.errors import DataError, LmmemError


@dataclass(frozen=True)
class GlyphConfig:
    seed: int = 0
    image_size: int = 28
    min_strokes: int = 2
    max_strokes: int = 4
    points_per_stroke: int = 4  # control points of a stroke's polyline
    jitter: float = 0.04  # per-point jitter, in units of the image side
    rotation_deg: float = 12.0  # ± per sample
    scale: float = 0.1  # ± relative per sample
    shift: float = 0.06  # ± per sample, units of the image side
    thickness: float = 0.022  # Gaussian pen width (blur sigma), units of the image side
    noise: float = 0.05  # std of additive pixel noise

    def validate(self) -> None:
        if self.image_size < 8:
            raise LmmemError(f"GlyphConfig.image_size must be >= 8, got {self.image_size}")
        if not 1 <= self.min_strokes <= self.max_strokes:
            raise LmmemError(f"GlyphConfig needs 1 <= min_strokes <= max_strokes, got {self.min_strokes}, {self.max_strokes}")
        if self.points_per_stroke < 2:
            raise LmmemError(f"GlyphConfig.points_per_stroke must be >= 2, got {self.points_per_stroke}")


_SAMPLES_PER_SEGMENT = 8  # points rendered along each polyline segment


def _class_strokes(cfg: GlyphConfig, cls: int) -> np.ndarray:
    """(max_strokes, points_per_stroke, 2) control points in [-0.7, 0.7]², NaN for unused strokes."""
    rng = np.random.default_rng([cfg.seed, 0, cls])
    n = int(rng.integers(cfg.min_strokes, cfg.max_strokes + 1))
    pts = np.full((cfg.max_strokes, cfg.points_per_stroke, 2), np.nan)
    for s in range(n):
        # A smooth random walk: a start point and steps of ~0.35 whose direction turns gradually.
        start = rng.uniform(-0.55, 0.55, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        p = [start]
        for _ in range(cfg.points_per_stroke - 1):
            angle += rng.normal(0, 0.9)
            p.append(np.clip(p[-1] + 0.35 * np.array([math.cos(angle), math.sin(angle)]), -0.7, 0.7))
        pts[s] = np.stack(p)
    return pts


def _render(points: torch.Tensor, valid: torch.Tensor, cfg: GlyphConfig) -> torch.Tensor:
    """Draw points (N, P, 2) in [-1, 1]² (``valid`` (N, P) masks padding) → ink (N, S, S) in [0, 1].

    Bilinear splatting of the dense stroke points onto the pixel grid, a Gaussian blur (the pen) and a
    saturating ``1 − exp(−a·x)`` so that overlapping points do not exceed full ink. O(N·P + N·S²)."""
    S = cfg.image_size
    N, P, _ = points.shape
    xy = (points + 1) / 2 * S - 0.5  # pixel coordinates (centres at integers)
    x0, y0 = xy[..., 0].floor(), xy[..., 1].floor()
    fx, fy = xy[..., 0] - x0, xy[..., 1] - y0
    canvas = torch.zeros(N, (S + 2) * (S + 2))  # one pixel of margin swallows off-image points
    n_idx = torch.arange(N).unsqueeze(1).expand(N, P)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        px = (x0 + dx + 1).clamp(0, S + 1).long()
        py = (y0 + dy + 1).clamp(0, S + 1).long()
        canvas.index_put_((n_idx.reshape(-1), (py * (S + 2) + px).reshape(-1)), (w * valid).reshape(-1), accumulate=True)
    canvas = canvas.reshape(N, 1, S + 2, S + 2)[:, :, 1:-1, 1:-1]
    sigma = max(cfg.thickness * S, 0.3)
    r = int(math.ceil(2.5 * sigma))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32).pow(2) / (2 * sigma**2))
    g = g / g.sum()
    canvas = torch.nn.functional.conv2d(canvas, g.view(1, 1, 1, -1), padding=(0, r))
    canvas = torch.nn.functional.conv2d(canvas, g.view(1, 1, -1, 1), padding=(r, 0))
    return (1 - torch.exp(-3.0 * canvas)).squeeze(1)


def make_glyphs(classes, samples_per_class: int, cfg: GlyphConfig = GlyphConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(len(classes) * samples_per_class, 1, S, S)`` and labels (the class ids given),
    ordered class-major. ``classes`` is an int or an iterable of class ids."""
    cfg.validate()
    classes = list(range(classes)) if isinstance(classes, int) else [int(c) for c in classes]
    if samples_per_class <= 0 or not classes:
        raise LmmemError(f"make_glyphs needs at least one class and samples_per_class > 0, got {len(classes)}, {samples_per_class}")
    t = np.linspace(0, 1, _SAMPLES_PER_SEGMENT, endpoint=False)
    all_pts, all_valid = [], []
    for c in classes:
        base = _class_strokes(cfg, c)  # (M, K, 2)
        rng = np.random.default_rng([cfg.seed, 1, c])
        ctrl = base[None] + rng.normal(0, cfg.jitter * 2, size=(samples_per_class, *base.shape))  # ×2: [-1,1] units
        theta = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, samples_per_class))
        scale = 1 + rng.uniform(-cfg.scale, cfg.scale, samples_per_class)
        shift = rng.uniform(-cfg.shift * 2, cfg.shift * 2, size=(samples_per_class, 2))
        rot = np.stack([np.stack([np.cos(theta), -np.sin(theta)], -1), np.stack([np.sin(theta), np.cos(theta)], -1)], -2)
        ctrl = np.einsum("nij,nmkj->nmki", rot * scale[:, None, None], ctrl) + shift[:, None, None, :]
        # Dense points along each segment: (n, M, K-1, T, 2) → (n, P, 2).
        a, b = ctrl[:, :, :-1, None, :], ctrl[:, :, 1:, None, :]
        dense = a + (b - a) * t[None, None, None, :, None]
        dense = np.concatenate([dense.reshape(samples_per_class, base.shape[0], -1, 2), ctrl[:, :, -1:, :]], axis=2)
        dense = dense.reshape(samples_per_class, -1, 2)
        all_pts.append(dense)
        all_valid.append(~np.isnan(dense[..., 0]))
    pts = torch.from_numpy(np.nan_to_num(np.concatenate(all_pts), nan=10.0)).float()
    valid = torch.from_numpy(np.concatenate(all_valid))
    img = _render(pts, valid, cfg)
    noise_rng = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, 2, len(classes), samples_per_class]).integers(2**31)))
    img = (img + cfg.noise * torch.randn(img.shape, generator=noise_rng)).clamp_(0, 1)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(samples_per_class)
    return img.unsqueeze(1), labels


# -- real Omniglot through Hugging Face datasets --------------------------------------------------

_LABEL_COLUMNS = ("label", "character", "class", "labels", "alphabet_char_id")


def load_omniglot(name_or_path: str | Path, split: str = "train", image_size: int = 28, image_column: str = "image",
                  label_column: str | None = None, max_classes: int | None = None,
                  cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Omniglot (or any image-classification set) via ``datasets.load_dataset(name_or_path)``.

    ``name_or_path``: a hub name (needs network) or a local folder / parquet file (a folder written by
    ``Dataset.save_to_disk`` is also accepted). The label column is ``label_column`` or the first of
    ``label, character, class, labels, alphabet_char_id`` present. Labels are remapped to ``0 .. C-1``
    in order of first appearance; ``max_classes`` keeps the first ``C``. Images are resized to
    ``image_size`` (bilinear), converted to grey and inverted if they are dark-on-light. ``cache_dir``
    is passed to ``load_dataset`` (default: the ``datasets`` cache)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - installed with lmmem's extras
        raise LmmemError("load_omniglot needs the `datasets` package: pip install datasets") from e
    path = Path(name_or_path)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
        elif path.suffix == ".parquet" and path.exists():
            ds = datasets.load_dataset("parquet", data_files=str(path), cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(str(name_or_path), cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"could not load Omniglot from {name_or_path!r} ({type(e).__name__}: {e}); pass a local folder or "
                        "parquet file, or a hub name with network access") from e
    if isinstance(ds, (datasets.DatasetDict, dict)):
        if split not in ds:
            raise DataError(f"split {split!r} not in {name_or_path!r}; available: {sorted(ds)}")
        ds = ds[split]
    cols = ds.column_names
    if image_column not in cols:
        raise DataError(f"no image column {image_column!r} in {name_or_path!r}; columns: {cols}")
    label_column = label_column or next((c for c in _LABEL_COLUMNS if c in cols), None)
    if label_column is None or label_column not in cols:
        raise DataError(f"no label column in {name_or_path!r} (tried {label_column or _LABEL_COLUMNS}); columns: {cols}; pass label_column=")
    from PIL import Image

    remap: dict = {}
    images, labels = [], []
    for row in ds:
        lab = row[label_column]
        if lab not in remap:
            if max_classes is not None and len(remap) >= max_classes:
                continue
            remap[lab] = len(remap)
        im = row[image_column]
        if not isinstance(im, Image.Image):
            im = Image.fromarray(np.asarray(im))
        im = im.convert("L").resize((image_size, image_size), Image.BILINEAR)
        images.append(np.asarray(im, dtype=np.float32) / 255.0)
        labels.append(remap[lab])
    if not images:
        raise DataError(f"{name_or_path!r} ({split}) holds no images")
    x = torch.from_numpy(np.stack(images)).unsqueeze(1)
    if float(x.mean()) > 0.5:  # dark strokes on a light background: make ink = 1
        x = 1.0 - x
    return x, torch.tensor(labels, dtype=torch.long)
