"""Corpora to token chunks: inputs streamed in pieces cut where the tokenizer cuts anyway, encoded
in worker processes, joined into chunks of documents separated by <|endoftext|>, written as .npz."""
import codecs
import contextlib
import csv
import glob
import io
import multiprocessing
import os
import tempfile
import zipfile
from collections import deque
from typing import NamedTuple

import numpy as np
import regex

import encoder as encoder_lib
from gpt2 import errors as errors_lib
from gpt2 import paths
from gpt2.errors import UserError

COMBINE = 50000  # characters per chunk before it is closed (nshepperd's default)
PIECE_CHARS = 1 << 18  # characters per piece handed to a worker; bounds memory per file
BLOCK_BYTES = 1 << 20  # bytes read from a file at a time
SPILL_BYTES = 2 << 20  # a chunk's tokens beyond this go to a temporary file, not memory
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


def corpus_items(inputs, *, column=0, header=True, encoding='utf-8', errors='strict',
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


# ---------------------------------------------------------------------------------------------
# Encoding in worker processes

_worker = {}


def _init_worker(enc, allowed):
    _worker['enc'] = enc
    _worker['allowed'] = allowed


def _encode_texts(texts, learned=()):
    """-> (token arrays, the words this process learned meanwhile); `learned`: words another
    process learned (see Encoder.words_since), added to this one's cache first."""
    enc, allowed = _worker['enc'], _worker['allowed']
    enc.add_words(learned)
    count = enc.word_count
    arrays = [enc.encode_array(t, allowed_special=allowed) for t in texts]
    return arrays, enc.words_since(count)


class _Done:
    """A finished result, standing in for a pool's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def ready(self):
        return True

    def get(self):
        return self.value


def _encoded(items, *, model_dir, enc, allowed, workers, piece_chars):
    """`items` in order, each text Item with its tokens, encoded by `workers` processes: this one
    and `workers - 1` forked from it (see _Tasks). At most 2 tasks per process are held, so
    reading never runs far ahead of encoding (bounded memory)."""
    enc = enc or encoder_lib.get_encoder(model_dir)
    _init_worker(enc, allowed)
    tasks = _Tasks(enc, allowed, workers, piece_chars)
    try:
        for item in items:
            tasks.add(item)
            yield from tasks.finished(keep=2 * workers)
        tasks.flush()
        yield from tasks.finished(keep=0)
    finally:
        tasks.close()


class _Tasks:
    """Text items grouped into tasks of at most about `piece_chars` characters, each encoded in
    the pool while it has fewer than 2 tasks per worker waiting (so none idles), else here rather
    than waiting; results come back in order. The BPE of a new word costs far more than
    pre-tokenising its text, so the processes pass the words each learns to the others with the
    tasks and results (only through this process: workers > 2 still repeat some of each other's
    work)."""

    def __init__(self, enc, allowed, workers, piece_chars):
        self.enc, self.piece_chars = enc, piece_chars
        self.pool, self.queued = None, 0
        if workers > 1:
            # Compile the pattern first, so the forked workers inherit it with the vocabulary.
            enc.encode_array('warm up')
            self.pool = multiprocessing.get_context().Pool(workers - 1, _init_worker,
                                                           (enc, allowed))
            self.queued = 2 * (workers - 1)
        self.pending = deque()  # (a task's items, or None for an item passed through; result;
        #                          whether it went to the pool)
        self.task, self.size = [], 0
        self.learned = []  # words to pass to the next pool task

    def add(self, item):
        if item.kind != TEXT:
            self.flush()
            self.pending.append((None, _Done(item), False))
            return
        if self.task and self.size + len(item.data) > self.piece_chars:
            self.flush()
        self.task.append(item)
        self.size += len(item.data)
        if self.size >= self.piece_chars:
            self.flush()

    def flush(self):
        if not self.task:
            return
        texts = [it.data for it in self.task]
        if sum(not r.ready() for _, r, _ in self.pending) < self.queued:
            result = self.pool.apply_async(_encode_texts, (texts, self.learned[:]))
            self.pending.append((self.task, result, True))
            self.learned.clear()
        else:
            arrays, words = _encode_texts(texts)
            self.learned.extend(words)
            self.pending.append((self.task, _Done((arrays, ())), False))
        self.task, self.size = [], 0

    def finished(self, *, keep):
        """Yield items in order while more than `keep` tasks wait or the first is done."""
        while self.pending and (len(self.pending) > keep or self.pending[0][1].ready()):
            group, result, pooled = self.pending.popleft()
            if group is None:
                yield result.get()
                continue
            arrays, words = result.get()
            if pooled:
                self.enc.add_words(words)
            for item, tokens in zip(group, arrays):
                yield item._replace(data=tokens, chars=len(item.data))

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def encode_items(items, *, model_dir=None, enc=None, combine=COMBINE, separator=True,
                 eot_in_text=True, workers=1, piece_chars=PIECE_CHARS, progress=None):
    """Yield (tokens, chunk_end): uint16 token arrays in corpus order, chunk_end True after the
    last array of a chunk. Documents in a chunk are separated by <|endoftext|> (id 50256) when
    `separator`; a chunk is closed after the document that brings it to `combine` characters;
    an .npz chunk stays a chunk of its own. `eot_in_text`: a literal <|endoftext|> in the text
    is that one token, else it is encoded as the 13 characters it is made of. The vocabulary is
    `model_dir`'s (see encoder.get_encoder), or `enc` itself when encoding in this process."""
    allowed = [encoder_lib.EOT] if eot_in_text else []
    eot = np.array([encoder_lib.EOT_ID], TOKEN_DTYPE)
    chars = docs = 0  # characters and documents with tokens in the open chunk
    in_doc = False  # the current document has produced tokens
    for item in _encoded(items, model_dir=model_dir, enc=enc, allowed=allowed, workers=workers,
                         piece_chars=piece_chars):
        if progress:
            progress(item.nbytes)
        if item.kind == TOKENS:
            if docs:
                yield eot[:0], True
                chars = docs = 0
            yield item.data, True
            continue
        tokens = item.data
        if len(tokens):
            if separator and docs and not in_doc:
                yield eot, False
            yield tokens.astype(TOKEN_DTYPE, copy=False), False
            in_doc = True
        chars += item.chars
        if item.doc_end:
            docs += in_doc
            in_doc = False
            if docs and chars >= combine:
                yield eot[:0], True
                chars = docs = 0
    if docs:
        yield eot[:0], True


# ---------------------------------------------------------------------------------------------
# The .npz file


def check_output(path, inputs=()):
    """UserError unless `path` is a .npz in an existing folder that is none of the inputs."""
    path = str(path)
    if not path.endswith('.npz'):
        raise UserError(f'the output {path!r} must end in .npz (the last argument is the output;'
                        ' inputs come before it)')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f'the output folder {folder} does not exist; create it first')
    real = os.path.realpath(path)
    if any(os.path.realpath(p) == real for p in inputs if os.path.exists(p)):
        raise UserError(f'the output {path} is also an input; choose another output name')
    return path


def write_npz(stream, path, *, compress=True):
    """Write the (tokens, chunk_end) stream as an .npz with one uint16 array per chunk (arr_0,
    arr_1, ...), streaming: a chunk larger than SPILL_BYTES waits in a temporary file, not in
    memory. Atomic and durable (paths.writing). -> (chunks, tokens)."""
    path = check_output(path)
    folder = os.path.dirname(os.path.abspath(path))
    chunks = total = 0
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with paths.writing(path) as f, \
            zipfile.ZipFile(f, 'w', method, allowZip64=True, compresslevel=1) as zf, \
            tempfile.TemporaryFile(dir=folder) as spill:
        held, held_bytes, spilled = [], 0, 0
        for tokens, end in stream:
            if len(tokens):
                held.append(tokens)
                held_bytes += tokens.nbytes
                if held_bytes > SPILL_BYTES:
                    for t in held:
                        spill.write(t.data)
                    spilled += held_bytes
                    held, held_bytes = [], 0
            if end:
                n = (spilled + held_bytes) // TOKEN_DTYPE.itemsize
                if n:
                    spill.seek(0)
                    _write_entry(zf, f'arr_{chunks}.npy', n, spill, spilled, held)
                    chunks += 1
                    total += n
                spill.seek(0)
                spill.truncate()
                held, held_bytes, spilled = [], 0, 0
        if not total:
            raise UserError('the corpus is empty: the inputs hold no text to encode')
    return chunks, total


def _write_entry(zf, name, n, spill, spilled, held):
    with zf.open(name, 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': TOKEN_DTYPE.str, 'fortran_order': False, 'shape': (n,)})
        while spilled:
            data = spill.read(min(spilled, BLOCK_BYTES))
            f.write(data)
            spilled -= len(data)
        for tokens in held:
            f.write(tokens.data)


def chunks_in_memory(stream):
    """The (tokens, chunk_end) stream as a list of int32 arrays, one per chunk."""
    chunks, held = [], []
    for tokens, end in stream:
        if len(tokens):
            held.append(tokens)
        if end and held:
            chunks.append(np.concatenate(held).astype(np.int32))
            held = []
    return chunks


def check_workers(workers):
    """None -> every core this process may use; else a whole number from 1."""
    if workers is None:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1
    errors_lib.check_whole('workers', workers, at_least=1)
    return workers


def input_bytes(inputs):
    """Total size of the files `inputs` expand to (the progress bar's total)."""
    return sum(os.path.getsize(p) for p in expand_paths(inputs))


@contextlib.contextmanager
def progress_bar(total, desc, enabled=True):
    """A tqdm bar in bytes (shown on a terminal) -> its update function; None when not enabled,
    without importing or setting up tqdm (which takes a lock and a while)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm
    with tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, desc=desc,
              disable=None, leave=False) as bar:
        yield bar.update


def encode_files(inputs, output, *, column=0, header=True, encoding='utf-8', errors='strict',
                 workers=None, compress=True, progress=True, piece_chars=PIECE_CHARS, **kw):
    """Encode text files, folders, globs, .csv and .npz inputs into the token .npz `output`.
    `kw` goes to encode_items (model_dir, combine, separator, eot_in_text).
    -> {'chunks', 'tokens', 'bytes', 'files'}."""
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise UserError('no inputs: pass text files, folders, globs, .csv or .npz, then OUTPUT.npz')
    files = expand_paths(inputs)
    check_output(output, files)
    workers = check_workers(workers)
    total = sum(os.path.getsize(p) for p in files)
    if total <= piece_chars:
        workers = 1  # one piece: starting processes would only cost time
    items = corpus_items(files, column=column, header=header, encoding=encoding, errors=errors,
                         piece_chars=piece_chars)
    with progress_bar(total, 'encoding', progress) as update:
        stream = encode_items(items, workers=workers, piece_chars=piece_chars, progress=update,
                              **kw)
        chunks, tokens = write_npz(stream, output, compress=compress)
    return {'chunks': chunks, 'tokens': tokens, 'bytes': total, 'files': len(files)}
