"""The one exception type that means "the user asked for something wrong", and the argparse type
checker that turns a bad value into one."""

import argparse


# Every character str.splitlines() breaks at, shown escaped: a name or path the user typed (or a
# file name on disk) may hold one, and the message must stay one line.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class UserError(Exception):
    """A mistake the user can fix: the CLI prints its one-line message and exits with code 2."""

    def __str__(self) -> str:
        return super().__str__().translate(_LINE_BREAKS)


def checked(convert, ok, rule: str):
    """An argparse type that converts and range-checks, with the rule in its error message."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or value != value or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse
