#!/usr/bin/env python3
"""Benchmark encode.py: MB/s in one process and with workers, against tiktoken single-thread in
the same run, and peak RSS at 1x and 10x the input (flat = streaming works). Not a test.
Each speed is the median of `repeat` runs (the shared 2-core machine is noisy), with the range.

Usage: flock /tmp/gpt2-bench.lock .venv/bin/python bench/encode.py [--min_mb=4] [--scale=10]
       [--repeat=3]
"""
import glob
import statistics
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fire  # noqa: E402

import encoder  # noqa: E402

CORPORA = os.path.join(os.path.dirname(ROOT), 'shared', 'corpora')

# Runs in a fresh interpreter (cold word cache, its own peak RSS); times encode_files only.
_CHILD = r'''
import json, resource, sys, time
sys.path.insert(0, {root!r})
from gpt2 import encoding
t = time.perf_counter()
stats = encoding.encode_files([{src!r}], {out!r}, workers={workers}, progress=False)
seconds = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps(dict(stats, seconds=seconds, rss_mb=rss / 1024)))
'''


def _child(src, out, workers):
    code = _CHILD.format(root=ROOT, src=src, out=out, workers=workers)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tiktoken():
    import tiktoken
    enc = encoder.get_encoder()
    ranks = {enc._token_bytes[i]: i for t, i in enc.encoder.items() if t != encoder.EOT}
    return tiktoken.Encoding(
        'gpt2-local', mergeable_ranks=ranks, special_tokens={encoder.EOT: encoder.EOT_ID},
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _median(mbs):
    return f'{statistics.median(mbs):6.2f} MB/s (range {min(mbs):.2f}-{max(mbs):.2f})'


def main(min_mb=4, scale=10, corpora=CORPORA, repeat=3):
    """Print MB/s (ours with 1 and 2 workers, tiktoken; medians of `repeat` runs, each of ours
    in a fresh interpreter) and peak RSS at 1x and `scale`x."""
    texts = []
    for path in sorted(glob.glob(os.path.join(corpora, '*.txt'))):
        with open(path, encoding='utf-8') as f:
            texts.append(f.read())
    base = '\n'.join(texts)
    reps = -(-int(min_mb * 1e6) // len(base.encode('utf-8')))
    corpus = '\n'.join([base] * reps)
    nbytes = len(corpus.encode('utf-8'))
    with tempfile.TemporaryDirectory() as tmp:
        src, big = os.path.join(tmp, 'corpus.txt'), os.path.join(tmp, 'big.txt')
        with open(src, 'w', encoding='utf-8') as f:
            f.write(corpus)
        with open(big, 'w', encoding='utf-8') as f:
            for _ in range(scale):
                f.write(corpus + '\n')
        tk = _tiktoken()
        tk_runs, rows = [], {1: [], 2: []}
        for _ in range(repeat):  # interleaved, so a busy spell hurts every row alike
            t = time.perf_counter()
            ref = tk.encode_ordinary(corpus)
            tk_runs.append(nbytes / 1e6 / (time.perf_counter() - t))
            for workers in rows:
                rows[workers].append(_child(src, os.path.join(tmp, f'o{workers}.npz'), workers))
        import numpy as np
        with np.load(os.path.join(tmp, 'o1.npz')) as z, np.load(os.path.join(tmp, 'o2.npz')) as z2:
            same = z['arr_0'].tolist() == ref
            same2 = z.files == z2.files and all((z[k] == z2[k]).all() for k in z.files)
        scaled = _child(big, os.path.join(tmp, 'big.npz'), 1)
    print(f'corpus: {len(texts)} files from {corpora}, x{reps} = {nbytes / 1e6:.2f} MB; '
          f'{os.cpu_count()} cores; ids equal to tiktoken: {same}; --workers 2 file equal: {same2}')
    tk_mbs = statistics.median(tk_runs)
    print(f'medians of {repeat} runs')
    print(f'tiktoken encode_ordinary, 1 thread : {_median(tk_runs)}')
    for workers, runs in rows.items():
        mbs = [nbytes / 1e6 / r['seconds'] for r in runs]
        print(f'encode.py --workers {workers}             : {_median(mbs)}, '
              f'{statistics.median(mbs) / tk_mbs:.2f}x tiktoken, '
              f'peak RSS {max(r["rss_mb"] for r in runs):.0f} MB')
    rss = max(r['rss_mb'] for r in rows[1])
    print(f'peak RSS, --workers 1: {rss:.0f} MB at {nbytes / 1e6:.1f} MB of input, '
          f'{scaled["rss_mb"]:.0f} MB at {scale * nbytes / 1e6:.1f} MB '
          f'({scaled["rss_mb"] / rss:.2f}x for {scale}x the input; '
          f'{scale * nbytes / 1e6 / scaled["seconds"]:.2f} MB/s)')


if __name__ == '__main__':
    fire.Fire(main)
