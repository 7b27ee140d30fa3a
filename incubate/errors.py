"""One exception type for mistakes a person can fix; the CLI prints it as one line."""


class UserError(Exception):
    """A bad input: the message says what is wrong, where, and how to fix it."""
