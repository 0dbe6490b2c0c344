"""The samples file: what sample.py prints and writes, train.py and the palimpsest write, and the
novelty filter reads. Each sample follows a delimiter line that numbers it from 1."""
import os

from gpt2.errors import UserError

# '<40 x => SAMPLE n <40 x =>' stands before each sample; any line starting with the 40 '=' is a
# delimiter, which the novelty filter never checks and always keeps.
SAMPLE_DELIMITER = '=' * 40
SAMPLE_HEADER = SAMPLE_DELIMITER + ' SAMPLE {} ' + SAMPLE_DELIMITER  # .format(sample number)


def format_samples(texts):
    """The samples file's text: each text after a SAMPLE_HEADER line with its number."""
    return ''.join(f'{SAMPLE_HEADER.format(i + 1)}\n{t}\n' for i, t in enumerate(texts))


def print_samples(texts, *, quiet=False):
    """The samples on stdout as the file holds them; `quiet`: without the delimiter lines."""
    for i, text in enumerate(texts):
        if not quiet:
            print(SAMPLE_HEADER.format(i + 1))
        print(text)


def read(path):
    """The text of a samples file, with a UserError for a path that is not a UTF-8 text file."""
    if not os.path.isfile(path):
        what = 'a folder' if os.path.isdir(path) else 'not found'
        raise UserError(f'samples file {path} is {what}; pass the text file sample.py wrote')
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f'samples file {path} is not UTF-8 text (byte {e.start}); '
                        'pass the text file sample.py wrote') from None
