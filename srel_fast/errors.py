"""Errors that the CLI reports as one clear sentence (no traceback)."""


class UserError(Exception):
    """Bad input or an unrecoverable condition the user can act on.

    The message is a single sentence that names the offending path, value or
    batch; the CLI prints it to stderr and exits with status 2."""


class NonFiniteLoss(UserError):
    """A recovery batch or a training step produced a NaN/Inf loss."""
