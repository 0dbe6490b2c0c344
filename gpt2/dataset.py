"""Training data: token chunks from .npz or text, a fair window sampler whose state can be saved,
and fixed validation batches."""
import numpy as np

from gpt2 import corpus
from gpt2 import encoding as encoding_lib
from gpt2.errors import UserError


def load_npz(path):
    """Chunks stored by encode.py (or nshepperd's encode.py): one 1-D token array (int32) per
    entry, checked as corpus.read_npz checks them."""
    return [arr.astype(np.int32) for arr, _ in corpus.read_npz(path)]


def load_chunks(paths, enc=None, *, combine=encoding_lib.COMBINE, separator=True,
                eot_in_text=True, column=0, header=True, encoding='utf-8', errors='strict',
                workers=1):
    """Token chunks (int32 arrays) from .npz files, text files, folders, globs and .csv, encoded
    on the fly exactly as encode.py writes them (same flags, see encode.py --help): small text
    files are joined, separated by <|endoftext|> (id 50256), into chunks of at least `combine`
    characters (nshepperd's rule). `enc`: an encoder.Encoder (default: the built-in vocabulary)."""
    items = corpus.read(paths, column=column, header=header, encoding=encoding, errors=errors)
    chunks = encoding_lib.chunks_in_memory(encoding_lib.encode_items(
        items, enc=enc, combine=combine, separator=separator, eot_in_text=eot_in_text,
        workers=workers))
    if not chunks:
        raise UserError(f'the dataset {paths} is empty: it holds no text or tokens')
    return chunks


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
            total = sum(len(c) for c in chunks)
            raise UserError(f'the dataset is too short for windows of {length} tokens: it has '
                            f'{total} tokens in {len(chunks)} chunk(s), the longest {longest}, and '
                            f'a window needs {length} in one chunk (add text, raise --combine '
                            'when encoding so small files share a chunk, or lower the context '
                            'length)')
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


def parse_curriculum(spec):
    """'a.npz:1000,b.npz:1000' -> [('a.npz', 1000), ('b.npz', 1000)] (steps on each, in order);
    'a.txt,b.txt' -> [('a.txt', None), ('b.txt', None)] (swap to the next at every save)."""
    items = [s.strip() for s in str(spec).split(',') if s.strip()]
    out = []
    for item in items:
        path, _, count = item.rpartition(':')
        if path and count.isdigit() and int(count) > 0:
            out.append((path, int(count)))
        elif path and count.strip().lstrip('-').isdigit():
            raise UserError(f'--curriculum entry {item!r}: the step count must be positive')
        else:
            out.append((item, None))
    if not out:
        raise UserError(f'--curriculum {spec!r} names no dataset: expected "a.npz:1000,b.npz:1000" '
                        'or "a.txt,b.txt" (swap at every save)')
    if len({n is None for _, n in out}) > 1:
        raise UserError(f'--curriculum {spec!r} mixes entries with and without step counts: give '
                        'every entry a count ("a:1000,b:500") or none (swap at every save)')
    return out


class Curriculum:
    """Which dataset step s (0-based) trains on: by step counts (each dataset for its count of
    steps, the last one after that), or, without counts, the next dataset (cycling) after every
    save. A function of the step alone, so a resumed run is on the same dataset."""

    def __init__(self, counts, save_every):
        self.counts = counts
        self.save_every = save_every
        if counts[0] is None and len(counts) > 1 and not save_every:
            raise UserError('a --curriculum that swaps at every save needs --save_every > 0')

    def index(self, step):
        if len(self.counts) == 1:
            return 0
        if self.counts[0] is None:
            return (step // self.save_every) % len(self.counts)
        end = 0
        for i, n in enumerate(self.counts):
            end += n
            if step < end:
                return i
        return len(self.counts) - 1

    def total(self):
        """Steps until the last counted dataset ends (None when swapping at saves)."""
        return None if self.counts[0] is None else sum(self.counts)
