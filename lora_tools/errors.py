"""Every error lora_tools raises on purpose, in one place.

Each class also subclasses the built-in exception it resembles, so callers can
catch `FileNotFoundError` or `ValueError` without knowing this module. The
exit code each error maps to lives here too: the CLI reads `exit_code` and
prints one line.
"""

from __future__ import annotations

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
    "OutputExistsError",
    "UnsupportedError",
    "EnvironmentProblem",
    "DeviceUnavailableError",
    "DiskSpaceError",
    "Interrupted",
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


class UnsupportedError(InvalidInputError, NotImplementedError):
    """The input is valid but asks for something lora_tools cannot do correctly."""


class EnvironmentProblem(LoraToolError, OSError):
    """The machine, not the input, is the problem: device, disk, network."""

    exit_code = EXIT_ENVIRONMENT


class DeviceUnavailableError(EnvironmentProblem):
    """The requested compute device does not exist here."""


class DiskSpaceError(EnvironmentProblem):
    """Not enough free space for the output."""


class Interrupted(LoraToolError):
    """A signal stopped the run; temporary output has been removed."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        self.exit_code = exit_code
        super().__init__(f"interrupted by {signal_name}; temporary output removed")
