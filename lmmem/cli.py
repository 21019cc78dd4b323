"""Shared CLI wrapper: user errors become one line on stderr and exit status 2, no traceback.

Exit statuses: 0 done, 2 a problem with the input, the options or the file system (one ``error:``
line naming the fix), 3 training diverged (the last good checkpoint is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from lmmem.errors import LmmemError, TrainingDiverged


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not state its default already and there is
    one to state (argparse's own formatter printed "(default: 3) (default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return text
        return super()._get_help_string(action)


def run_cli(main, argv=None) -> int:
    from lmmem.safety import describe_os_error

    try:
        return main(argv)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except LmmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a path that is a file: the environment, not a bug
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
