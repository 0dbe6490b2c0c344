"""Training data: token chunks from .npz or text, a fair window sampler whose state can be saved,
and fixed validation batches."""
import glob
import os

import numpy as np

import encoder as encoder_lib
from gpt2.errors import UserError


def expand_paths(paths):
    """Files, folders (recursive) and globs -> sorted list of files; UserError for a missing path."""
    if isinstance(paths, str):
        paths = [paths]
    out = []
    for p in paths:
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


def load_npz(path):
    """Chunks stored by encode.py (or nshepperd's encode.py): one 1-D token array per entry."""
    try:
        with np.load(path) as npz:
            return [npz[k].astype(np.int32) for k in npz.files]
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is not a readable .npz token file: {e}') from None


def load_chunks(paths, enc=None, *, combine=50000):
    """Token chunks from .npz files and text files; small text files are joined, separated by
    <|endoftext|> (id 50256), into chunks of at least `combine` characters (nshepperd's rule)."""
    enc = enc or encoder_lib.get_encoder()
    chunks, texts, size = [], [], 0
    for path in expand_paths(paths):
        if path.endswith('.npz'):
            chunks.extend(load_npz(path))
            continue
        try:
            with open(path, encoding='utf-8') as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise UserError(f'{path} is not UTF-8 text (byte {e.start}); '
                            'convert it, or encode it with encode.py --errors replace') from None
        texts.append(text)
        size += len(text)
        if size >= combine:
            chunks.append(_encode_joined(enc, texts))
            texts, size = [], 0
    if texts:
        chunks.append(_encode_joined(enc, texts))
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise UserError(f'no tokens in {paths}: the dataset is empty')
    return chunks


def _encode_joined(enc, texts):
    ids = []
    for text in texts:
        if ids:
            ids.append(enc.eot_token)
        ids.extend(enc.encode(text, allowed_special=[encoder_lib.EOT]))
    return np.asarray(ids, dtype=np.int32)


class Sampler:
    """Windows of `length` tokens drawn uniformly over every start position at which the window
    fits inside one chunk (so no window crosses a chunk boundary), from a seeded generator whose
    state round-trips through state()/set_state()."""

    def __init__(self, chunks, length, seed=0):
        self.chunks = chunks
        self.length = length
        starts = np.array([max(len(c) - length + 1, 0) for c in chunks], dtype=np.int64)
        self.total = int(starts.sum())
        if self.total == 0:
            longest = max((len(c) for c in chunks), default=0)
            raise UserError(f'the dataset is too short for windows of {length} tokens: its longest '
                            f'chunk has {longest} tokens, and {length} are needed '
                            '(add text, or lower the context length)')
        self.boundaries = np.cumsum(starts)
        self.rng = np.random.default_rng(seed)

    def sample(self):
        """One window [length] (int32)."""
        i = int(self.rng.integers(self.total))
        c = int(np.searchsorted(self.boundaries, i, side='right'))
        start = i - (int(self.boundaries[c - 1]) if c else 0)
        return self.chunks[c][start:start + self.length]

    def batch(self, batch_size):
        """[batch_size, length] int32."""
        return np.stack([self.sample() for _ in range(batch_size)]).astype(np.int32)

    def state(self):
        """The generator's state (a JSON-able dict); restoring it replays the same windows."""
        return self.rng.bit_generator.state

    def set_state(self, state):
        self.rng.bit_generator.state = state


def validation_batches(chunks, length, batch_size, count, seed=1):
    """`count` fixed batches drawn once from their own seeded sampler, so every evaluation of a
    run scores the same windows."""
    sampler = Sampler(chunks, length, seed=seed)
    return [sampler.batch(batch_size) for _ in range(count)]
