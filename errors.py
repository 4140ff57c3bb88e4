"""One exception hierarchy: every message says what was wrong, where, and what to do."""

from __future__ import annotations

import contextlib
import contextvars

# whether the user speaks through the command line (options are '--init-image') or Python ('init_image')
_COMMAND_LINE = contextvars.ContextVar("edgediff_command_line", default=False)


def arg(name: str) -> str:
    """An option as the user spells it: '--init-image' on the command line, 'init_image' in Python."""
    return "--" + name.replace("_", "-") if _COMMAND_LINE.get() else name


@contextlib.contextmanager
def command_line():
    """Inside, messages name options as flags (the CLI runs each command in it)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


class EdgediffError(Exception):
    """Base of every error edgediff raises on purpose. The CLI prints it without a traceback."""

    exit_code = 1


class UsageError(EdgediffError):
    """A bad argument or option: the user can fix the command line (exit code 2)."""

    exit_code = 2


class SourceError(EdgediffError):
    """A model file or folder that cannot be read, validated or recognised."""


class UnsafeFileError(SourceError):
    """A pickle-based checkpoint that would run code when loaded."""


class PackageError(EdgediffError):
    """An edgediff package that is missing, incomplete or of an unknown format version."""


class RuntimeFailure(EdgediffError):
    """A component failed while running (provider, numerics)."""


class MissingDependencyError(EdgediffError):
    """An optional dependency is needed for this action and is not installed."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or fail with the install command that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed "
            f"({exc}). Install it with: pip install 'edgediff[{extra}]'"
        ) from exc
