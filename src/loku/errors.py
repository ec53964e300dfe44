"""One error type for everything a user can fix: the CLI prints its message on one line and exits 2."""


class LokuError(Exception):
    """A problem with the user's input, worded as `what is wrong: how to fix it`."""
