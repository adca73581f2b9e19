"""The one exception type the CLI turns into a single error line."""


class FpetError(Exception):
    """A problem the user can act on: bad input, a missing file, a model that does not fit a schedule."""
