"""The appliance's exception hierarchy.

Every error that reaches a user carries a one-line message naming what was wrong and what is
accepted. The CLI maps :class:`ApplianceError` subclasses to exit code 2 (bad usage or bad input)
unless the subclass says otherwise.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    exit_code = 2


class UsageError(ApplianceError):
    """A command-line argument is wrong."""


class ConfigError(ApplianceError):
    """A configuration file or key is missing, malformed or out of range."""


class FormatError(ApplianceError):
    """A file on disk or a message on the wire does not have the expected format."""


class StateDirError(ApplianceError):
    """A state folder cannot be created or written."""


class DependencyError(ApplianceError):
    """A required external program or library is missing."""


class VerificationError(ApplianceError):
    """A signature, hash or chain check failed."""

    exit_code = 1
