"""The one exception type for mistakes a user can fix (bad config, missing data, unreachable hub)."""


class UserInputError(ValueError):
    """A problem in the user's input; its message names the problem and the fix.

    ``train.py`` prints it as one line and exits with status 2 instead of a traceback.
    """
