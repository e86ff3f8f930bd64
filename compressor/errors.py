"""One exception class per exit code. Library code raises these; only the CLI prints."""

from __future__ import annotations


class CompressError(Exception):
    """Base class: every error the tool reports to a user on one line."""

    exit_code: int = 1


class QualityCheckFailed(CompressError):
    exit_code = 1


class UsageError(CompressError):
    """A flag or value that cannot be right whatever the input files hold."""

    exit_code = 2


class InvalidInputError(CompressError):
    """A missing, unreadable or corrupt model, dataset or calibration source."""

    exit_code = 3


class NumericalError(CompressError):
    """NaN/Inf or a decomposition that cannot be made sound."""

    exit_code = 4


class OutOfResourcesError(CompressError):
    """Memory or disk ran out."""

    exit_code = 5


EXIT_INTERRUPTED = 130


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line, for one-line error reports."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def first_few(items: list[str], shown: int = 5) -> str:
    """Up to ``shown`` items joined by commas, and how many more there are, for error messages."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def problems_message(what: str, problems: list[str], shown: int = 8) -> str:
    """``what`` and up to ``shown`` problems on one line, and how many more there are."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{what}: {'; '.join(problems[:shown])}{more}"
