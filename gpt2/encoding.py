"""Corpora to token chunks: the pieces gpt2/corpus.py reads encoded in worker processes, joined
into chunks of documents separated by <|endoftext|>, written as .npz."""
import contextlib
import multiprocessing
import os
import tempfile
import zipfile
from collections import deque

import numpy as np

import encoder as encoder_lib
from gpt2 import corpus
from gpt2 import errors as errors_lib
from gpt2 import paths
from gpt2.errors import UserError

COMBINE = 50000  # characters per chunk before it is closed (nshepperd's default)
SPILL_BYTES = 2 << 20  # a chunk's tokens beyond this go to a temporary file, not memory


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
        if item.kind != corpus.TEXT:
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
                 eot_in_text=True, workers=1, piece_chars=corpus.PIECE_CHARS, progress=None):
    """Yield (tokens, chunk_end): uint16 token arrays in corpus order, chunk_end True after the
    last array of a chunk. Documents in a chunk are separated by <|endoftext|> (id 50256) when
    `separator`; a chunk is closed after the document that brings it to `combine` characters;
    an .npz chunk stays a chunk of its own. `eot_in_text`: a literal <|endoftext|> in the text
    is that one token, else it is encoded as the 13 characters it is made of. The vocabulary is
    `model_dir`'s (see encoder.get_encoder), or `enc` itself when encoding in this process."""
    allowed = [encoder_lib.EOT] if eot_in_text else []
    eot = np.array([encoder_lib.EOT_ID], corpus.TOKEN_DTYPE)
    chars = docs = 0  # characters and documents with tokens in the open chunk
    in_doc = False  # the current document has produced tokens
    for item in _encoded(items, model_dir=model_dir, enc=enc, allowed=allowed, workers=workers,
                         piece_chars=piece_chars):
        if progress:
            progress(item.nbytes)
        if item.kind == corpus.TOKENS:
            if docs:
                yield eot[:0], True
                chars = docs = 0
            yield item.data, True
            continue
        tokens = item.data
        if len(tokens):
            if separator and docs and not in_doc:
                yield eot, False
            yield tokens.astype(corpus.TOKEN_DTYPE, copy=False), False
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
                n = (spilled + held_bytes) // corpus.TOKEN_DTYPE.itemsize
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
            f, {'descr': corpus.TOKEN_DTYPE.str, 'fortran_order': False, 'shape': (n,)})
        while spilled:
            data = spill.read(min(spilled, corpus.BLOCK_BYTES))
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
                 workers=None, compress=True, progress=True, piece_chars=corpus.PIECE_CHARS,
                 **kw):
    """Encode text files, folders, globs, .csv and .npz inputs into the token .npz `output`.
    `kw` goes to encode_items (model_dir, combine, separator, eot_in_text).
    -> {'chunks', 'tokens', 'bytes', 'files'}."""
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise UserError('no inputs: pass text files, folders, globs, .csv or .npz, then OUTPUT.npz')
    files = corpus.expand_paths(inputs)
    check_output(output, files)
    workers = check_workers(workers)
    total = sum(os.path.getsize(p) for p in files)
    if total <= piece_chars:
        workers = 1  # one piece: starting processes would only cost time
    items = corpus.read(files, column=column, header=header, encoding=encoding, errors=errors,
                        piece_chars=piece_chars)
    with progress_bar(total, 'encoding', progress) as update:
        stream = encode_items(items, workers=workers, piece_chars=piece_chars, progress=update,
                              **kw)
        chunks, tokens = write_npz(stream, output, compress=compress)
    return {'chunks': chunks, 'tokens': tokens, 'bytes': total, 'files': len(files)}
