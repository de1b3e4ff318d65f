"""Errors that end a command with one line and exit status 2."""


class InputError(Exception):
    """Invalid user input: a config key, a data file, a checkpoint or a flag.

    The message is a single line that names the file, row, column or key, so the
    command-line entry point prints it as is and exits with status 2.
    """


class ConfigError(InputError):
    """Invalid configuration: unknown key, wrong type, missing file."""


class DataError(InputError):
    """Invalid data file: missing column, bad id, NaN, bad label, empty file."""
