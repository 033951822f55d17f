"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """Bad input or environment: main.py prints the message and exits with status 2."""
