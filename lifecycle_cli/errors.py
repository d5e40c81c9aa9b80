"""The one exception type for input a user can fix."""


class UserError(Exception):
    """Bad input: the CLI prints the message as one line and exits with code 2, no traceback."""
