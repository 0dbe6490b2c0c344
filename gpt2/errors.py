"""The exception types for mistakes a person can fix (flags, files, hparams, vocabularies)."""
from encoder import EncoderError


class UserError(Exception):
    """Bad input from the command line, a file or hparams.

    The message says what is wrong, the value received and what was expected; the scripts print it
    as one line on stderr and exit non-zero (see gpt2/cli.py).
    """


# What the scripts report as one line: ours, and the encoder package's (which stands alone).
USER_ERRORS = (UserError, EncoderError)


def is_whole(value, at_least=0):
    """An int (not a bool, which Python counts as one) of at least `at_least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


def not_whole(flag, value, *, at_least=0, note=''):
    """None if `value` is a whole number >= at_least, else the problem, naming --flag."""
    if is_whole(value, at_least):
        return None
    return f'--{flag} must be a whole number >= {at_least}, got {value!r}' + (
        f' ({note})' if note else '')


def check_whole(flag, value, *, at_least=0, note=''):
    """UserError with not_whole's problem, if there is one."""
    problem = not_whole(flag, value, at_least=at_least, note=note)
    if problem:
        raise UserError(problem)


def check_choice(flag, value, choices, *, note=''):
    """UserError unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f'unknown --{flag} {value!r}: expected one of '
                        f'{", ".join(map(str, choices))}{f" ({note})" if note else ""}')
