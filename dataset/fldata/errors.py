"""The error type the generation scripts report as a one-line message."""


class DatasetError(ValueError):
    """Bad parameters or unusable input data; the message says what to change."""
