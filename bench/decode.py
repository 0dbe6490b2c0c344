"""Decode speed at the 124M shape: ours (XLA and plain TF) against Hugging Face, same run.

Random weights (no download), a 16-token prompt and 128 new greedy tokens, batch 1 and 8. Also
measures memory bandwidth (a compiled sum over 1 GiB, both cores, before each batch size) and
reports each speed as a fraction of the bandwidth bound (every weight read once per step); runs
the palimpsest keep mode with a checkpoint swap every 16 tokens against plain decode, and sampled
decoding (temperature 1, top_k 40) on both sides. Run one benchmark at a time:

    flock /tmp/gpt2-bench.lock .venv/bin/python bench/decode.py
"""
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire  # noqa: E402
import numpy as np  # noqa: E402

from gpt2 import hparams as hparams_lib  # noqa: E402
from gpt2 import fast, model, sampling  # noqa: E402


def bandwidth(nbytes=1 << 30, repeats=5):
    """Bytes per second read by a compiled sum over a large array (both cores, reads only, like
    the weights in a decode step), best of `repeats`."""
    import tensorflow as tf
    x = tf.ones([nbytes // 4], tf.float32)
    total = tf.function(tf.reduce_sum, jit_compile=True)
    return nbytes / _best(lambda: total(x).numpy(), repeats)


def _best(fn, repeats):
    fn()  # warm up: compiles and first-touch
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ours(hp, params, prompts, new, *, jit_compile, spans=None, top_k=None):
    """Greedy, or with top_k a draw at temperature 1 from the top_k most likely tokens."""
    spans = spans or [(0, (fast.for_decoding(params),), (1.0,))]

    def go():
        sampling.run_spans(hp, spans, prompts=prompts, batch_size=len(prompts), length=new,
                           temperature=1.0 if top_k else 0, top_k=top_k or 0, top_p=1.0, seed=0,
                           jit_compile=jit_compile)
    return go


def huggingface(prompts, new, threads, top_k=None):
    import torch
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    ids = torch.tensor(prompts)

    def go():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=bool(top_k), top_k=top_k or None,
                              temperature=1.0 if top_k else None, top_p=None, use_cache=True,
                              pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new
    return go


def main(batches=(1, 8), prompt=16, new=128, repeats=3, swap_every=16, hf=True, threads=None,
         top_k=40):
    """Print tokens/s for each batch size: ours with and without XLA, Hugging Face, the bound.

    --batches sizes to run; --prompt, --new tokens; --repeats timed runs (best kept);
    --swap_every palimpsest swap interval; --hf=False skips Hugging Face; --threads for torch;
    --top_k for the sampled rows (temperature 1, both sides; 0 skips them).
    """
    import tensorflow as tf
    threads = threads or os.cpu_count()
    hp = hparams_lib.PRESETS['124M']
    params = model.init_params(hp, seed=0)
    other = fast.for_decoding(model.init_params(hp, seed=1))
    weight_bytes = sum(np.asarray(x).nbytes for x in tf.nest.flatten(params))
    print(f'TF {tf.__version__}, {os.cpu_count()} CPUs, weights {weight_bytes / 1e6:.0f} MB')
    rng = np.random.default_rng(0)
    for b in batches:
        prompts = rng.integers(0, hp.n_vocab, [b, prompt]).tolist()
        bw = bandwidth()
        bound = b * bw / weight_bytes
        rows = {}
        for jit in (True, False):
            rows[f'ours xla={jit}'] = _best(ours(hp, params, prompts, new, jit_compile=jit),
                                            repeats)
        best_jit = min((rows['ours xla=True'], True), (rows['ours xla=False'], False))[1]
        tensors = fast.for_decoding(params)
        spans = [(i, ((tensors, other)[(i // swap_every) % 2],), (1.0,))
                 for i in range(0, new, swap_every)]
        rows[f'palimpsest keep, swap/{swap_every}'] = _best(
            ours(hp, params, prompts, new, jit_compile=best_jit, spans=spans), repeats)
        if hf:
            rows['huggingface'] = _best(huggingface(prompts, new, threads), repeats)
        if top_k:
            rows[f'sampled top_k={top_k}'] = _best(
                ours(hp, params, prompts, new, jit_compile=best_jit, top_k=top_k), repeats)
            if hf:
                rows[f'huggingface sampled top_k={top_k}'] = _best(
                    huggingface(prompts, new, threads, top_k=top_k), repeats)
        print(f'\nbatch {b}: bandwidth {bw / 1e9:.1f} GB/s, bound {bound:.1f} tokens/s')
        plain = rows[f'ours xla={best_jit}']
        for name, t in rows.items():
            tps = b * new / t
            extra = ''
            sampled = name.startswith('sampled')
            peer = f'huggingface sampled top_k={top_k}' if sampled else 'huggingface'
            if peer in rows and not name.startswith('huggingface'):
                extra += f'  {rows[peer] / t:.2f}x HF'
            if name.startswith('palimpsest'):
                extra += f'  {plain / t:.0%} of plain'
            print(f'  {name:28s} {tps:7.1f} tokens/s  {tps / bound:5.0%} of bound{extra}')


if __name__ == '__main__':
    fire.Fire(main)
