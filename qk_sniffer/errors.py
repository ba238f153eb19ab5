"""The package's errors: one base class, and how an error becomes the CLI's exit status.

Every error the package raises for the user to act on derives from :class:`QkSnifferError`; its message alone says
what is wrong and how to fix it, so the CLI and the preflight print it as one line without a traceback. Errors of
the operating system (a missing file, a full disk, the network) are shown the same way. Anything else is a bug and
keeps its traceback. The classes live next to the code that raises them (``ConfigError`` here, being everyone's);
each names :class:`QkSnifferError` first among its bases and the built-in error it refines (``ValueError``,
``RuntimeError``, ...) second, so ``except ValueError`` keeps working where it did.
"""

from __future__ import annotations


class QkSnifferError(Exception):
    """An error the user can act on; the message is the one line they read."""

    exit_code = 1


class ConfigError(QkSnifferError, ValueError):
    """The configuration (or a command-line value) is wrong; the message names the key and the fix."""

    exit_code = 2


class UnsupportedModelError(QkSnifferError, RuntimeError):
    """The model cannot be captured exactly; the message names the class and the way out."""


def is_expected(exc: BaseException) -> bool:
    """Whether ``exc`` is shown as its message alone: the package's own errors and operating-system errors."""
    return isinstance(exc, (QkSnifferError, OSError))


def exit_code(exc: BaseException) -> int:
    """The CLI's exit status for ``exc``: 2 for a config error, 1 for any other failure."""
    return exc.exit_code if isinstance(exc, QkSnifferError) else 1
