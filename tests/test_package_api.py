"""The top-level package: lazily exported names are listed by dir() and __all__, resolve on use, and
`import lmmem` (dir() included) stays free of torch, transformers and triton."""

from __future__ import annotations

import subprocess
import sys

import lmmem


def test_dir_and_all_list_the_lazy_exports_and_each_resolves():
    lazy = set(lmmem._LAZY)
    assert lazy <= set(dir(lmmem)) and lazy <= set(lmmem.__all__)
    assert {"LmmemError", "__version__"} <= set(dir(lmmem))
    for name in lmmem.__all__:
        assert getattr(lmmem, name) is not None, name
    assert lmmem.HebbianSoftmax.__module__.startswith("lmmem.output_layers")


def test_import_and_dir_import_nothing_heavy():
    code = ("import sys, lmmem; names = dir(lmmem); ns = {}; exec('from lmmem import LmmemError', ns); "
            "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]; "
            "assert not heavy, heavy; assert 'HebbianSoftmax' in names")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
