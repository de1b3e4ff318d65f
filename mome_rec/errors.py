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


def first_line(error: BaseException) -> str:
    """Return the first line of ``error``'s message, or its type name when the message is empty.

    For a ``torch.distributed.checkpoint`` ``CheckpointException``, whose own
    message only lists the failed ranks, the first failed rank's error is used:
    its ``failures`` maps each rank to ``(exception, traceback)``.
    """
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return first_line(next(iter(failures.values()))[0])
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
