"""The one exception type a user should ever see.

A :class:`UserError` is bad input or an unusable environment: the CLI prints its message as a
single line and exits with code 2, no traceback. Every message names the problem *and* the fix.
"""


class UserError(Exception):
    """Bad input or environment; ``str(error)`` is one line naming the problem and the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(" ".join(message.split()))
