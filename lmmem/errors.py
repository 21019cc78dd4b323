"""User-facing errors.

Anything a user can cause (a wrong path, a mismatched checkpoint, a bad flag value) raises
:class:`LmmemError` with a one-line message that names the fix. The CLIs print that line and
exit with status 2 instead of showing a traceback from deep inside the library.
"""


class LmmemError(Exception):
    """An error caused by the user's input; the message says what to do about it."""


class DataError(LmmemError):
    """A corpus, vocabulary or prepared-data folder is missing, malformed or mismatched."""


class CheckpointError(LmmemError):
    """A checkpoint is missing, truncated, of another format version, or does not match the data."""


class TrainingDiverged(LmmemError):
    """The loss became NaN, infinite or far above ln V; the last good checkpoint was kept (exit 3).
    ``step`` and ``loss`` say where (``loss`` is None when the parameters, not the loss, went bad)."""

    def __init__(self, message: str, *, step: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.step, self.loss = step, loss
