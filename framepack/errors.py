"""Errors a user can meet, with the exit code the CLI gives them.

A `UserError` is bad input or usage (exit 2): the message says what was
wrong, the value, and what to do. Anything else that is expected but not the
user's fault (a download that failed, a backend that cannot run) is a
`FramepackError` (exit 1). Everything else is a bug and gets a traceback.
"""


class FramepackError(Exception):
    """An expected failure with a one-line explanation for the user."""

    exit_code = 1


class UserError(FramepackError):
    """Bad input or usage: the command line, a file or a setting."""

    exit_code = 2


class ConfigError(UserError):
    """A profile file, table or key that is wrong."""


class PluginError(FramepackError):
    """A plugin that cannot be loaded, or a backend that is missing."""


class DiskFull(FramepackError):
    """The disk filled up, or would (exit 1): the message says how much space is needed
    and what was kept."""


class Cancelled(FramepackError):
    """A job stopped on request (``cancel`` set, Ctrl-C, SIGTERM) at a step boundary.

    ``job_dir`` is its job folder: the checkpoint of the last finished section
    and a playable partial video are there, and ``Pipeline.resume(job_dir)``
    (``framepack resume``) continues it. None when no section had finished."""

    def __init__(self, message: str, job_dir=None) -> None:
        super().__init__(message)
        self.job_dir = job_dir
