"""A prepared corpus's ``meta.json`` in a few lines for people (printed after a preparation)."""

from __future__ import annotations

from pathlib import Path

from lmmem.data.vocab import EOS, UNK


def print_summary(out: Path, meta: dict) -> None:
    """Counts in the style of nanoGPT's prepare.py, one line per split."""
    tok = meta["tokenizer"]
    how = f"{tok['type']}/{tok.get('rule', tok.get('model_type', ''))}"
    opts = meta.get("options", {})
    detail = f"min count {opts['min_count']}" if "min_count" in opts and tok["type"] == "words" else ""
    if opts.get("max_vocab"):
        detail += f", max {opts['max_vocab']:,}"
    print(f"prepared {meta['corpus']} from {meta['source']} -> {out}")
    if meta.get("vocab_from"):
        vf = meta["vocab_from"]
        print(f"vocab size: {meta['vocab_size']:,} ({how}), the vocabulary of {vf.get('checkpoint', vf['corpus'])} "
              f"(fingerprint {vf['fingerprint']}); one {EOS} per {meta['unit']}")
    else:
        print(
            f"vocab size: {meta['vocab_size']:,} ({how}; from {'+'.join(meta['vocab_splits'])}"
            f"{'; ' + detail if detail else ''}); one {EOS} per {meta['unit']}"
        )
    for split, info in meta["splits"].items():
        docs = info.get("documents")
        extra = f" in {docs:,} document{'s' if docs != 1 else ''}" if docs else ""
        line = f"{split} has {info['tokens']:,} tokens{extra}; {UNK} {100 * info['unk_rate']:.2f}%"
        if "oov_rate" in info:
            line += f" (out-of-vocabulary {100 * info['oov_rate']:.2f}%)"
        print(line)
    if meta.get("unknown_words"):
        print(describe_unknown(meta["unknown_words"]))
    if meta.get("decoding"):
        print("\n".join(describe_decoding(meta["decoding"])))


def describe_unknown(info: dict, n: int = 10) -> str:
    """One summary line for meta.json's ``unknown_words`` (``--vocab-from``)."""
    common = ", ".join(f"{w} ({c:,})" for w, c in info["most_common"][:n])
    return (f"unknown words: {info['tokens']:,} tokens of {info['types']:,} types became <unk>"
            + (f"; most frequent: {common}" if common else ""))


def describe_decoding(info: dict, limit: int = 10) -> list[str]:
    """Summary lines for meta.json's ``decoding`` record (see ``data_prep.gutenberg``)."""
    total = info.get("lines", {})
    out = ["decoded lines: " + ", ".join(f"{n:,} {how}" for how, n in total.items())]
    books = info.get("books", {})
    for i, (name, b) in enumerate(books.items()):
        if i == limit:
            out.append(f"  ... and {len(books) - limit:,} more books (all in meta.json)")
            break
        declared = f"declares {b['declared']!r}" if b.get("declared") else "no declaration"
        out.append(f"  {name} ({declared}, read as {b['read_as']}): " + ", ".join(f"{n:,} {how}" for how, n in b["lines"].items()))
    return out
