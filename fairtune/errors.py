"""The one exception type that means "the user asked for something wrong"."""


class UserError(Exception):
    """A mistake the user can fix: the CLI prints its one-line message and exits with code 2."""
