"""Errors a user can fix. The CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input: a missing path, an unsupported option, data that is too short."""
