"""User-facing errors: one clear line naming the problem and the fix."""


class MonorouteError(Exception):
    """An error caused by bad input. The CLI prints its message as one line and exits non-zero."""
