"""Errors caused by the user's input: the CLI prints them without a traceback."""


class UserError(Exception):
    """A mistake in a recipe, a data file or an argument. The message says where."""
