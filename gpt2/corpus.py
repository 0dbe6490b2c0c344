"""Reading corpora: text files, folders, globs, .csv rows and token .npz files as one stream of
Items, text streamed in pieces cut where the tokenizer cuts anyway (so the pieces encode as the
whole file does)."""
import codecs
import csv
import glob
import io
import os
from typing import NamedTuple

import numpy as np
import regex

import encoder as encoder_lib
from gpt2 import errors as errors_lib
from gpt2.errors import UserError

PIECE_CHARS = 1 << 18  # characters per piece handed to a worker; bounds memory per file
BLOCK_BYTES = 1 << 20  # bytes read from a file at a time
TOKEN_DTYPE = np.dtype('<u2')  # GPT-2's 50257 ids fit in uint16
ERRORS = ('strict', 'replace', 'ignore')
TEXT = 'text'  # the kinds of Item
TOKENS = 'tokens'


class Item(NamedTuple):
    """One unit of a corpus stream: a piece of text (`doc_end` after a document's last piece) or
    the tokens of an .npz chunk (a chunk of its own). `nbytes`: the input bytes it stands for (for
    progress). Encoded, a text item holds its tokens in `data` and its length in `chars`."""
    kind: str
    data: object
    nbytes: int
    doc_end: bool = True
    chars: int = 0


def expand_paths(inputs):
    """Files, folders (recursive) and globs -> list of files in order, each folder and glob sorted;
    UserError for a missing path."""
    if isinstance(inputs, str):
        inputs = [inputs]
    out = []
    for p in map(str, inputs):
        if os.path.isfile(p):
            out.append(p)
        elif os.path.isdir(p):
            out.extend(sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                              if not f.startswith('.')))
        else:
            matches = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not matches:
                raise UserError(f'no such file, folder or glob match: {p}')
            out.extend(matches)
    return out


# ---------------------------------------------------------------------------------------------
# Reading text in pieces


def cut_point(text):
    """An index p (0 < p < len) at which encoding text[:p] and text[p:] apart gives the same ids
    as encoding text whole, as late as possible and at a line end when there is one; 0 if none.

    p is safe when text[p-1] is not whitespace and text[p] is: no token of PATTERN spans a
    non-space followed by a space, and no token before p looks past text[p-1]. So the cut goes
    just after the last visible character of a line (before its newline and trailing blanks)."""
    end = text.rfind('\n')
    while end > 0:
        p = end
        while p > 0 and _SPACE.match(text, p - 1):
            p -= 1
        if p > 0:
            return p
        end = text.rfind('\n', 0, p)
    # One long line: the last visible character followed by a space will do.
    m = _LAST_VISIBLE_THEN_SPACE.search(text)
    return m.start() + 1 if m else 0


_SPACE = regex.compile(r'\s')  # PATTERN's whitespace
_LAST_VISIBLE_THEN_SPACE = regex.compile(r'(?r)\S\s')  # (?r): search from the end


def _codec(encoding):
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f'unknown text encoding {encoding!r}; expected a Python codec name '
                        'such as utf-8, latin-1 or cp1252') from None
    # utf-8-sig decodes plain UTF-8 too and drops a leading byte-order mark.
    return 'utf-8-sig' if name == 'utf-8' else name


def _check_errors(errors):
    errors_lib.check_choice('errors', errors, ERRORS)


def read_blocks(path, *, encoding='utf-8', errors='strict', block=BLOCK_BYTES):
    """Yield (text, nbytes) for consecutive blocks of a file. UserError for a binary file (a NUL
    byte) or bytes that are not valid in `encoding`, with the byte offset."""
    codec = _codec(encoding)
    _check_errors(errors)
    decoder = codecs.getincrementaldecoder(codec)(errors)
    check_nul = not codec.startswith(('utf-16', 'utf-32'))  # NUL bytes are normal there
    offset = 0
    with open(path, 'rb') as f:
        while True:
            data = f.read(block)
            nul = data.find(b'\x00') if check_nul else -1
            if nul >= 0:
                raise UserError(f'{path} looks like a binary file (a NUL byte at byte '
                                f'{offset + nul}); pass text files, folders of them, .csv or .npz')
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                bad = e.object[e.start:e.end].hex(' ')
                raise UserError(
                    f'{path} is not valid {encoding}: byte {offset - pending + e.start} is {bad}; '
                    'convert the file, name its encoding with --encoding (e.g. latin-1), or pass '
                    '--errors=replace to put U+FFFD in its place') from None
            offset += len(data)
            if text or data:
                yield text, len(data)
            if not data:
                return


def read_pieces(path, *, piece_chars=PIECE_CHARS, **kw):
    """Yield (text, nbytes) pieces of at most about `piece_chars` characters whose encodings
    concatenate to the encoding of the whole file (see cut_point); memory stays near one read
    block. A block's bytes are shared among its pieces in proportion to their length."""
    buf, nbytes = '', 0
    for text, n in read_blocks(path, **kw):
        buf += text
        nbytes += n
        while len(buf) >= piece_chars:
            # Cut within the first piece_chars if possible, so pieces stay small (they are the
            # unit of work for the encoding processes); else as late as possible.
            p = cut_point(buf[:piece_chars]) or cut_point(buf)
            if not p:  # no safe cut yet (no whitespace at all): read on
                break
            share = nbytes * p // len(buf)
            yield buf[:p], share
            buf, nbytes = buf[p:], nbytes - share
    if buf or nbytes:
        yield buf, nbytes


def read_csv(path, *, column=0, header=True, encoding='utf-8', errors='strict'):
    """Yield (text, nbytes) for each row's cell in `column` (an index, or a header name when
    `header`); the header row is skipped; rows with every field empty are skipped."""
    codec = _codec(encoding)
    _check_errors(errors)
    # Long posts exceed the csv module's default field limit of 128 KB.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with open(path, 'rb') as raw:
        text = io.TextIOWrapper(raw, encoding=codec, errors=errors, newline='')
        reader = csv.reader(_lines_without_nul(text, path))
        done = 0
        try:
            index = column
            if header:
                names = next(reader, None)
                if names is None:
                    return
                if isinstance(column, str):
                    if column not in names:
                        raise UserError(f'{path} has no column {column!r}; its header names '
                                        f'{names}; pass --column=NAME or an index from 0')
                    index = names.index(column)
            elif isinstance(column, str):
                raise UserError(f'--column={column!r} names a column, but --header=False says '
                                f'{path} has no header row; pass a column index from 0')
            if not isinstance(index, int) or index < 0:
                raise UserError(f'--column={column!r}: expected a column index from 0 or a name')
            for row in reader:
                if not any(row):
                    continue
                if index >= len(row):
                    raise UserError(f'{path} line {reader.line_num}: the row has {len(row)} fields'
                                    f', no column {index}; pass --column to pick another column')
                now = raw.tell()
                yield row[index], now - done
                done = now
        except UnicodeDecodeError:
            # TextIOWrapper's error offsets are relative to its buffer: find the true one.
            for _ in read_blocks(path, encoding=encoding, errors='strict'):
                pass
            raise
        except csv.Error as e:
            raise UserError(f'{path} line {reader.line_num} is not valid CSV: {e}') from None
        yield '', os.path.getsize(path) - done


def _lines_without_nul(lines, path):
    for n, line in enumerate(lines, 1):
        if '\x00' in line:
            raise UserError(f'{path} looks like a binary file (a NUL byte on line {n}); pass text'
                            ' files, folders of them, .csv or .npz')
        yield line


def read_npz(path, *, n_vocab=encoder_lib.EOT_ID + 1):
    """Yield (tokens, nbytes) for each chunk of a token .npz (ours or nshepperd's), as uint16."""
    try:
        npz = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is not a readable .npz token file: {e}') from None
    with npz:
        names = npz.files
        for i, name in enumerate(names):
            arr = npz[name]
            if arr.ndim != 1 or arr.dtype.kind not in 'iu':
                raise UserError(f'{path}: entry {name} is a {arr.dtype} array of shape {arr.shape};'
                                ' expected 1-D integer token ids as encode.py writes')
            if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= n_vocab):
                raise UserError(f'{path}: entry {name} has token ids outside 0..{n_vocab - 1} '
                                f'(min {arr.min()}, max {arr.max()}); it is not a GPT-2 token file')
            share = os.path.getsize(path) // len(names)
            yield arr.astype(TOKEN_DTYPE), share


def read(inputs, *, column=0, header=True, encoding='utf-8', errors='strict',
                 piece_chars=PIECE_CHARS):
    """The inputs as a stream of Items: text pieces (a file, or a csv row, is one document) and
    the tokens of each chunk of an .npz."""
    kw = dict(encoding=encoding, errors=errors)
    for path in expand_paths(inputs):
        low = path.lower()
        if low.endswith('.npz'):
            for arr, n in read_npz(path):
                yield Item(TOKENS, arr, n)
        elif low.endswith('.csv'):
            for text, n in read_csv(path, column=column, header=header, **kw):
                yield Item(TEXT, text, n)
        else:
            last = None
            for piece in read_pieces(path, piece_chars=piece_chars, **kw):
                if last:
                    yield Item(TEXT, *last, doc_end=False)
                last = piece
            yield Item(TEXT, *(last or ('', 0)))


def input_bytes(inputs):
    """Total size of the files `inputs` expand to (the progress bar's total)."""
    return sum(os.path.getsize(p) for p in expand_paths(inputs))
