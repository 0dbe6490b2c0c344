"""Decode speed at the 124M shape: ours (XLA and plain TF) against Hugging Face, same run.

Random weights (no download), a 16-token prompt and 128 new greedy tokens, batch 1 and 8. Also
measures memory bandwidth (a compiled sum over 1 GiB, both cores, before each batch size) and
reports each speed as a fraction of the bandwidth bound (every weight read once per step); runs
the palimpsest keep mode with a checkpoint swap every 16 tokens against plain decode, and sampled
decoding (temperature 1, top_k 40) on both sides. `--dtypes` adds our narrow decoding copies
(sample.py --dtype bf16, int8) against their peers: Hugging Face with bf16 weights and
CTranslate2 (`pip install ctranslate2`; the same random GPT-2 converted) in float32 and int8.
Run one benchmark at a time:

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
from gpt2 import fast, model, sampling, settings  # noqa: E402


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


def ours(hp, params, prompts, new, *, jit_compile, spans=None, top_k=None, dtype='fp32'):
    """Greedy, or with top_k a draw at temperature 1 from the top_k most likely tokens."""
    spans = spans or [sampling.Span.fixed(fast.for_decoding(params, dtype))]
    s = settings.SampleSettings(batch_size=len(prompts), length=new,
                                temperature=1.0 if top_k else 0, top_k=top_k or 0, seed=0)

    def go():
        sampling.run_spans(hp, spans, s, prompts=prompts, jit_compile=jit_compile)
    return go


def _hf_model(bf16=False):
    import torch
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    return hf.to(torch.bfloat16) if bf16 else hf


def huggingface(prompts, new, threads, top_k=None, bf16=False):
    import torch
    torch.set_num_threads(threads)
    hf = _hf_model(bf16)
    ids = torch.tensor(prompts)

    def go():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=bool(top_k), top_k=top_k or None,
                              temperature=1.0 if top_k else None, top_p=None, use_cache=True,
                              pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new
    return go


def ctranslate2_model(folder, compute_type, threads):
    """The random Hugging Face GPT-2 converted for CTranslate2, loaded with `compute_type`."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    src, out = os.path.join(folder, 'hf'), os.path.join(folder, 'ct2')
    if not os.path.isdir(out):
        import shutil
        import encoder
        _hf_model().save_pretrained(src)
        vocab = os.path.dirname(encoder.__file__)   # GPT-2's tokenizer files, HF's names
        shutil.copy(os.path.join(vocab, 'encoder.json'), os.path.join(src, 'vocab.json'))
        shutil.copy(os.path.join(vocab, 'vocab.bpe'), os.path.join(src, 'merges.txt'))
        TransformersConverter(src).convert(out, force=True)
    return ctranslate2.Generator(out, device='cpu', compute_type=compute_type,
                                 intra_threads=threads)


def ctranslate2_decode(gen, prompts, new):
    import json
    import encoder
    with open(os.path.join(os.path.dirname(encoder.__file__), 'encoder.json')) as f:
        token = {i: t for t, i in json.load(f).items()}   # CTranslate2 takes token strings
    start = [[token[t] for t in p] for p in prompts]

    def go():
        res = gen.generate_batch(start, max_length=new,
                                 min_length=new, sampling_topk=1, include_prompt_in_result=False)
        assert all(len(r.sequences_ids[0]) == new for r in res)
    return go


def main(batches=(1, 8), prompt=16, new=128, repeats=3, swap_every=16, hf=True, threads=None,
         top_k=40, dtypes=False, hf_bf16=True):
    """Print tokens/s for each batch size: ours with and without XLA, Hugging Face, the bound.

    --batches sizes to run; --prompt, --new tokens; --repeats timed runs (best kept);
    --swap_every palimpsest swap interval; --hf=False skips Hugging Face; --threads for torch;
    --top_k for the sampled rows (temperature 1, both sides; 0 skips them); --dtypes adds
    ours in bf16 and int8, Hugging Face bf16 and CTranslate2 float32 and int8 (greedy);
    --hf_bf16=False leaves out Hugging Face bf16 (on a CPU without AVX512_BF16 its bf16 weights
    decode at a few tokens/s, and batch 8 took over 18 minutes).
    """
    import tensorflow as tf
    threads = threads or os.cpu_count()
    hp = hparams_lib.PRESETS['124M']
    params = model.init_params(hp, seed=0)
    other = fast.for_decoding(model.init_params(hp, seed=1))
    weight_bytes = sum(np.asarray(x).nbytes for x in tf.nest.flatten(params))
    print(f'TF {tf.__version__}, {os.cpu_count()} CPUs, weights {weight_bytes / 1e6:.0f} MB')
    rng = np.random.default_rng(0)
    # fire hands `--batches 1` over as an int, `--batches 1,8` as a tuple
    for b in (batches,) if isinstance(batches, int) else batches:
        prompts = rng.integers(0, hp.n_vocab, [b, prompt]).tolist()
        bw = bandwidth()
        bound = b * bw / weight_bytes
        rows = {}
        for jit in (True, False):
            rows[f'ours xla={jit}'] = _best(ours(hp, params, prompts, new, jit_compile=jit),
                                            repeats)
        best_jit = min((rows['ours xla=True'], True), (rows['ours xla=False'], False))[1]
        tensors = fast.for_decoding(params)
        spans = [sampling.Span.fixed((tensors, other)[(i // swap_every) % 2], start=i)
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
        if dtypes:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                for dtype in ('bf16', 'int8'):
                    rows[f'ours {dtype}'] = _best(ours(hp, params, prompts, new, jit_compile=True,
                                                       dtype=dtype), repeats)
                if hf and hf_bf16:
                    rows['huggingface bf16'] = _best(
                        huggingface(prompts, new, threads, bf16=True), repeats)
                for ct in ('float32', 'int8'):
                    gen = ctranslate2_model(tmp, ct, threads)
                    rows[f'ctranslate2 {ct}'] = _best(ctranslate2_decode(gen, prompts, new),
                                                      repeats)
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
            if name in ('ours bf16', 'ours int8'):
                for peer, short in (('huggingface bf16', 'HF-bf16'),
                                    ('ctranslate2 int8', 'CT2-int8')):
                    if peer in rows:
                        extra += f'  {rows[peer] / t:.2f}x {short}'
            print(f'  {name:28s} {tps:7.1f} tokens/s  {tps / bound:5.0%} of bound{extra}')


if __name__ == '__main__':
    fire.Fire(main)
