"""Every error lora_tools raises on purpose, in one place.

Each class also subclasses the built-in exception it resembles, so callers can
catch `FileNotFoundError` or `ValueError` without knowing this module. The
exit code each error maps to lives here too: the CLI reads `exit_code` and
prints one line.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "EXIT_INVALID",
    "EXIT_ENVIRONMENT",
    "LoraToolError",
    "InvalidInputError",
    "CorruptFileError",
    "UnsafePickleError",
    "UnknownFormatError",
    "IncompatibleError",
    "NonFiniteError",
    "OutputNameError",
    "OptionValueError",
    "OutputExistsError",
    "UnsupportedError",
    "EnvironmentProblem",
    "DeviceUnavailableError",
    "DiskSpaceError",
    "FileTooLargeError",
    "NotWritableError",
    "PathTooLongError",
    "TooManyOpenFilesError",
    "NotAFolderError",
    "Interrupted",
    "os_error_problem",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_ENVIRONMENT = 4


class LoraToolError(Exception):
    """Root of every error lora_tools raises deliberately."""

    exit_code = EXIT_INTERNAL


class InvalidInputError(LoraToolError, ValueError):
    """An input file, option or combination of them cannot be used as given."""

    exit_code = EXIT_INVALID


class CorruptFileError(InvalidInputError):
    """A file is truncated, malformed, or disagrees with its own header or index."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafePickleError(CorruptFileError):
    """A pickle asks for something outside torch's weights-only allow-list."""


class UnknownFormatError(InvalidInputError):
    """No reader recognises the file or folder."""


class IncompatibleError(InvalidInputError):
    """An adapter does not fit its base; `problems` lists every mismatch found."""

    def __init__(self, summary: str, problems: list[str]) -> None:
        self.problems = list(problems)
        shown = "; ".join(self.problems[:8])
        more = f"; and {len(self.problems) - 8} more" if len(self.problems) > 8 else ""
        super().__init__(f"{summary}: {shown}{more}")


class NonFiniteError(InvalidInputError, ArithmeticError):
    """A tensor that would reach the output holds NaN or Inf."""


class OutputExistsError(InvalidInputError, FileExistsError):
    """The output path exists (and --force was not given) or would overwrite an input."""


class OutputNameError(LoraToolError, ValueError):
    """The output path's name says file where a folder is written (or the reverse): a usage error."""

    exit_code = EXIT_USAGE


class OptionValueError(LoraToolError, ValueError):
    """An option's value is malformed (a `--rename` rule without `=`, a regex that does not compile): a usage error."""

    exit_code = EXIT_USAGE


class UnsupportedError(InvalidInputError, NotImplementedError):
    """The input is valid but asks for something lora_tools cannot do correctly."""


class EnvironmentProblem(LoraToolError, OSError):
    """The machine, not the input, is the problem: device, disk, network."""

    exit_code = EXIT_ENVIRONMENT


class DeviceUnavailableError(EnvironmentProblem):
    """The requested compute device does not exist here."""


class DiskSpaceError(EnvironmentProblem):
    """Not enough free space for the output."""


class FileTooLargeError(EnvironmentProblem):
    """A file would grow past the size limit of the process (ulimit -f) or of the filesystem."""


class NotWritableError(EnvironmentProblem, PermissionError):
    """The filesystem is read-only, or permissions or attributes forbid writing there."""


class PathTooLongError(EnvironmentProblem):
    """A file name or path is longer than the filesystem allows."""


class TooManyOpenFilesError(EnvironmentProblem):
    """The process or the system ran out of file descriptors."""


class NotAFolderError(InvalidInputError, NotADirectoryError):
    """A path goes through a file as if it were a folder."""


#: errno → (error class, what it means and what to do). Errors that name two
#: files (a copy) name the one written in `filename2`.
_OS_ERRORS: dict[int, tuple[type[LoraToolError], str]] = {
    errno.ENOSPC: (DiskSpaceError, "the disk filled up (no space left on device); free some space or write elsewhere"),
    errno.EDQUOT: (DiskSpaceError, "disk quota exceeded; free some of your quota or write elsewhere"),
    errno.EFBIG: (
        FileTooLargeError,
        "the file is larger than this system allows: ulimit -f or the filesystem's limit "
        "(raise it, or use a smaller --max-shard-size where the command has one)",
    ),
    errno.EROFS: (NotWritableError, "the filesystem is read-only; write somewhere writable"),
    errno.EACCES: (NotWritableError, "permission denied; check the owner and mode of this path or its folder"),
    errno.EPERM: (
        NotWritableError,
        "operation not permitted; check this path's folder (its mode, or an immutable attribute: lsattr)",
    ),
    errno.ENAMETOOLONG: (PathTooLongError, "the name is too long for this filesystem; choose a shorter path"),
    errno.EMFILE: (TooManyOpenFilesError, "too many open files for this process; raise ulimit -n"),
    errno.ENFILE: (
        TooManyOpenFilesError,
        "the system has too many open files; close some programs or raise fs.file-max",
    ),
    errno.ENOTDIR: (NotAFolderError, "part of this path is a file, not a folder; check the path"),
    errno.EEXIST: (OutputExistsError, "already exists, in the way (a file where a folder is needed?); check the path"),
}


def os_error_problem(exc: BaseException, where: str | None = None) -> LoraToolError | None:
    """The error to report for an `OSError` that the machine, not lora_tools, caused; None for any other.

    Args:
        exc: the exception that stopped the run.
        where: the path to name when `exc` names none (e.g. the download cache).
    """
    if not isinstance(exc, OSError) or isinstance(exc, LoraToolError) or exc.errno not in _OS_ERRORS:
        return None
    kind, meaning = _OS_ERRORS[exc.errno]
    path = exc.filename2 if exc.filename2 is not None and exc.errno != errno.ENOTDIR else exc.filename
    path = where if path is None else path
    return kind(f"{os.fsdecode(path)}: {meaning}" if path is not None else meaning)


class Interrupted(LoraToolError):
    """A signal stopped the run; temporary output has been removed."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"interrupted by {signal_name}; temporary output removed")
