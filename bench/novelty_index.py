"""How to store a corpus's n-grams for the novelty filter: memory and lookup time of a Python set of
token tuples (the script a writer would write), a Python set of 64-bit hashes, and the sorted uint64
array gpt2.novelty uses (looked up with searchsorted, or with np.isin).

    flock /tmp/gpt2-bench.lock .venv/bin/python bench/novelty_index.py [--corpus PATHS] [--ngram 8]

With no --corpus it builds ~10 MB of text from ../shared/corpora (each copy's lines shuffled, so
most n-grams that span lines differ between copies).
"""
import gc
import os
import random
import sys
import tempfile
import time
import tracemalloc

import fire
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import encoder as encoder_lib  # noqa: E402
from gpt2 import corpus as corpus_lib, novelty  # noqa: E402

SHARED_CORPORA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'corpora')


def _measure(build):
    """(result, seconds, traced MiB still held by the result, traced peak MiB while building)."""
    gc.collect()
    tracemalloc.start()
    t = time.perf_counter()
    out = build()
    seconds = time.perf_counter() - t
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, held / 2**20, peak / 2**20


def _ten_megabytes(folder):
    texts = [open(p, encoding='utf-8').read() for p in corpus_lib.expand_paths(SHARED_CORPORA)]
    lines = '\n'.join(texts).splitlines()
    path = os.path.join(folder, 'corpus.txt')
    with open(path, 'w', encoding='utf-8') as f:
        size, copy = 0, 0
        while size < 10e6:
            random.Random(copy).shuffle(lines)
            size += f.write('\n'.join(lines) + '\n')
            copy += 1
    return path


def main(corpus=None, ngram=novelty.DEFAULT_NGRAM):
    enc = encoder_lib.get_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        _run(corpus or _ten_megabytes(tmp), ngram, enc)


def _run(paths, ngram, enc):
    size = sum(os.path.getsize(p) for p in corpus_lib.expand_paths(paths))
    index, t_index, held_index, peak_index = _measure(
        lambda: novelty.Index(paths, ngram=ngram, enc=enc))
    print(f'corpus: {size / 1e6:.1f} MB, {index!r}')
    print(f'gpt2.novelty.Index build: {t_index:.1f} s, holds {held_index:.0f} MiB, '
          f'peak {peak_index:.0f} MiB (traced by tracemalloc)')

    # The same corpus's tokens, to store in each candidate structure.
    toks = []
    for path in index.files:
        for lines in novelty._documents(path, enc):
            toks.append(np.array(enc.encode(''.join(' ' + n for n in map(novelty.normalise, lines)
                                                     if n)), dtype=np.int64))
    hashes = [novelty.ngram_hashes(t, ngram) for t in toks]
    rng = np.random.default_rng(0)
    probe_toks = rng.integers(0, 50000, 200_000)  # mostly absent n-grams, as in new writing
    probe_toks[:100_000] = np.concatenate(toks)[:100_000]  # and some present
    probe = novelty.ngram_hashes(probe_toks, ngram)
    probe_tuples = [tuple(probe_toks[i:i + ngram].tolist()) for i in range(len(probe))]

    rows = []
    tuples, t, held, peak = _measure(lambda: {tuple(t[i:i + ngram].tolist()) for t in toks
                                              for i in range(len(t) - ngram + 1)})
    t0 = time.perf_counter()
    want = np.array([p in tuples for p in probe_tuples])
    rows.append(('set of token tuples', t, held, peak, time.perf_counter() - t0))
    del tuples
    ints, t, held, peak = _measure(lambda: set(np.concatenate(hashes).tolist()))
    t0 = time.perf_counter()
    got = np.array([p in ints for p in probe.tolist()])
    rows.append(('set of hashed ints', t, held, peak, time.perf_counter() - t0))
    assert (got == want).all()
    del ints
    arr, t, held, peak = _measure(lambda: np.unique(np.concatenate(hashes)))
    t0 = time.perf_counter()
    got = novelty._contains(arr, probe)
    rows.append(('sorted uint64 + searchsorted', t, held, peak, time.perf_counter() - t0))
    assert (got == want).all()
    t0 = time.perf_counter()
    got = np.isin(probe, arr)
    rows.append(('sorted uint64 + np.isin', t, held, peak, time.perf_counter() - t0))
    assert (got == want).all()

    base_held, base_query = rows[0][2], rows[0][4]
    print(f'{len(arr)} distinct {ngram}-grams; lookups of {len(probe)} generated {ngram}-grams')
    print(f'{"structure":30} {"build s":>8} {"held MiB":>9} {"peak MiB":>9} {"lookup s":>9} '
          f'{"memory vs tuples":>17} {"lookup vs tuples":>17}')
    for name, t, held, peak, q in rows:
        print(f'{name:30} {t:8.2f} {held:9.1f} {peak:9.1f} {q:9.3f} {held / base_held:16.3f}x '
              f'{q / base_query:16.3f}x')


if __name__ == '__main__':
    fire.Fire(main)
