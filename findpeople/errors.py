"""The named exceptions a run reports: each message names the file (or process) and what to do.

Used in every process; raised by the stages, caught by the orchestration (run.py), which turns
them into the summary's problem list and the exit code.
"""
from __future__ import annotations



class BadInput(Exception):
    """A user file (video, photo, model, folder) that cannot be used; the message names it."""


class ClipError(Exception):
    """ffmpeg failed to cut a clip; the message names the video, range, exit code and stderr."""


class OutputError(Exception):
    """A file in OUTPUT_DIR could not be written (disk full, no permission); the message names it."""


class PipelineBroken(Exception):
    """A decoder or worker process died or failed; carries its name, exit code and traceback."""

    def __init__(self, name: str, exitcode, remote_traceback: str = ""):
        how = "failed" if exitcode is None else f"stopped (exit code {exitcode})"
        super().__init__(f"{name} {how}\n{remote_traceback}".rstrip())
        self.name, self.exitcode, self.remote_traceback = name, exitcode, remote_traceback

    def __reduce__(self):  # pickled whole (a Ray task's error reaches the driver so)
        return PipelineBroken, (self.name, self.exitcode, self.remote_traceback)
