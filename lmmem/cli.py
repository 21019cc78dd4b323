"""Shared CLI wrapper: user errors become one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

import sys

from lmmem.errors import LmmemError


def run_cli(main, argv=None) -> int:
    from lmmem.training.trainer import TrainingDiverged

    try:
        return main(argv)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except LmmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
