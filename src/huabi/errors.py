"""The one exception type users see.

Every bad input huabi can name is raised as a ``HuabiError`` whose message is a
single line naming the problem; the CLI prints it and exits non-zero.
"""


class HuabiError(ValueError):
    """A user-facing error: one line, naming the field or file at fault."""
