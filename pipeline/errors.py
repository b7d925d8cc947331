"""The project's own error types.

Every problem a user can cause is raised as an :class:`EptqError` whose message is
one line naming the problem and the fix; the CLI prints it and exits with
``exit_code`` (2 for usage errors, 1 for failures at run time), never a traceback.
"""

from __future__ import annotations


class EptqError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code = 1


class UsageError(EptqError):
    """Bad input the user can fix (file, flag, profile, data): exit code 2."""

    exit_code = 2


class ProfileError(UsageError):
    """A hardware profile that is unknown, malformed or impossible."""


class DataError(UsageError):
    """Representative or evaluation data that cannot be used."""


class ModelError(UsageError):
    """A model that cannot be loaded or captured."""


class UnsupportedOpError(ModelError):
    """An operator outside the canonical op set."""


class TargetError(EptqError):
    """A target that cannot express the quantized graph, or whose runtime failed."""


class BundleError(EptqError):
    """A bundle whose files or manifest changed after export (failed verification)."""
