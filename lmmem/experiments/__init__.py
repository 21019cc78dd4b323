"""Experiments that reproduce comparisons end to end (prepare → train → evaluate → results page)."""


def describe(doc: str) -> str:
    """A runner's ``--help`` description: the first paragraph of its module docstring, on one line,
    without reST markup (the first line alone is often cut mid-sentence)."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    for markup in (":func:", ":class:", ":mod:", ":meth:"):
        text = text.replace(markup, "")
    return text.replace("``", "").replace("`", "")
