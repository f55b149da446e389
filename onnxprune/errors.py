"""Errors meant for users: the CLI prints their message as one line, without a traceback."""


class OnnxpruneError(Exception):
    """A problem with the user's input (files, flags, models, data) rather than a bug."""
