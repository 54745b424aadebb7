"""The one exception for bad input."""


class InputError(ValueError):
    """Bad input from the user. The message names the flag or file at fault."""
