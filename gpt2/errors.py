"""The one exception type for mistakes a person can fix (flags, files, hparams)."""


class UserError(Exception):
    """Bad input from the command line, a file or hparams.

    The message says what is wrong, the value received and what was expected; the scripts print it
    as one line on stderr and exit non-zero (see gpt2/cli.py).
    """
