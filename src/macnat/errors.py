"""The one exception type the CLI turns into a one-line message and exit code 1."""


class MacnatError(Exception):
    """A failure the user can act on; the message says what to do."""
