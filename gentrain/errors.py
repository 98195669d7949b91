"""User-facing errors: the CLI prints these as one line (no traceback) and exits non-zero."""


class GentrainError(Exception):
    """A problem with the user's input (config, data, checkpoint, launch), stated in one line
    that names the file/key/sample at fault and what would be right."""


class DataError(GentrainError):
    """Bad data: names the shard and the sample key."""
