"""The products a decode step of 124M takes (its 48 block matrices and the [50257, 768] output
layer), read by XLA's CPU backend in the ways an int8 copy could be read, at a few row counts.

    python bench/int8_products.py [--rows 1,2,8,16] [--repeats 3]

Rows: `fp32` float32 weights, weights first (as gpt2/fast.py's linear takes few rows); `int8 in
the product` int8 weights converted to float32 inside the product (what fast.py does at one row:
weight-only, so the activations stay float32); `s8 x s8` int8 weights against int8 activations
into int32 (XLA's integer dot: what a weight-and-activation int8 scheme such as CTranslate2's
would run, the activations rounded to 8 bits per row). Milliseconds for all 49 products, best of
--repeats; the weights (498 MB in float32) do not fit in any cache, so each run reads them from
memory as a decode step does.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import fire  # noqa: E402

from bench.decode import _best  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]


def main(rows=(1, 2, 8, 16), repeats=3):
    import tensorflow as tf
    rng = np.random.default_rng(0)
    wf = [tf.constant(rng.standard_normal(s, np.float32)) for s in SHAPES]
    wq = [tf.constant(rng.integers(-127, 128, s).astype(np.int8)) for s in SHAPES]

    def summed(product):
        # The products' outputs summed into one number, so that nothing is left out or kept.
        @tf.function(jit_compile=True)
        def f(ws, x):
            return tf.add_n([tf.reduce_sum(tf.cast(product(w, x[:, :w.shape[1]]), tf.float32))
                             for w in ws])
        return f

    sides = {
        'fp32': (summed(lambda w, x: tf.matmul(w, x, transpose_b=True)), wf, tf.float32),
        'int8 in the product': (summed(lambda w, x: tf.matmul(tf.cast(w, tf.float32), x,
                                                              transpose_b=True)), wq, tf.float32),
        's8 x s8 -> s32': (summed(lambda w, x: tf.linalg.matmul(w, x, transpose_b=True,
                                                                output_type=tf.int32)),
                           wq, tf.int8),
    }
    print(f'TF {tf.__version__}, {os.cpu_count()} CPUs; ms for the 49 products of a 124M step')
    for r in (rows,) if isinstance(rows, int) else rows:
        x = rng.standard_normal((r, 3072)).astype(np.float32)
        line = []
        for name, (fn, ws, dtype) in sides.items():
            xs = tf.constant(np.clip(np.round(x * 40), -127, 127).astype(np.int8)
                             if dtype == tf.int8 else x)
            ms = _best(lambda: fn(ws, xs).numpy(), repeats) * 1e3
            line.append(f'{name} {ms:7.1f}')
        print(f'rows {r:3d}:  ' + '   '.join(line), flush=True)


if __name__ == '__main__':
    fire.Fire(main)
