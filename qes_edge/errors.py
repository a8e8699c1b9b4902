"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class QesError(Exception):
    """A problem with the user's input or environment, reported as one line."""
