"""The exception types for mistakes a person can fix (flags, files, hparams, vocabularies)."""
from encoder import EncoderError


class UserError(Exception):
    """Bad input from the command line, a file or hparams.

    The message says what is wrong, the value received and what was expected; the scripts print it
    as one line on stderr and exit non-zero (see gpt2/cli.py).
    """


# What the scripts report as one line: ours, and the encoder package's (which stands alone).
USER_ERRORS = (UserError, EncoderError)
