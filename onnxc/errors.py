"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""


class OnnxcError(Exception):
    """Bad input or an operation that cannot be done; shown to the user without a traceback."""

    exit_code = 1


class UsageError(OnnxcError):
    """The command or its options are wrong (unknown pass, bad spec, bad value)."""

    exit_code = 2


class VerificationError(OnnxcError):
    """The result exists but does not compute what the original did within the budget."""

    exit_code = 3
