"""The one exception type that means "the user asked for something wrong"."""


# Every character str.splitlines() breaks at, shown escaped: a name or path the user typed (or a
# file name on disk) may hold one, and the message must stay one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class UserError(Exception):
    """A mistake the user can fix: the CLI prints its one-line message and exits with code 2."""

    def __str__(self) -> str:
        return super().__str__().translate(_LINE_BREAKS)
