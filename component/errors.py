"""The model core's errors for what the user must fix; both are `datatools.errors.UserError`s."""

from datatools.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the fix."""


class InputError(UserError, ValueError):
    """An input the user must fix (a missing or unreadable file, an empty list); the message names it."""
