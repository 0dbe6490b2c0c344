"""Training throughput and peak memory at the 124M shape against Hugging Face's GPT2LMHeadModel
(dropout 0, AdamW) measured in the same run, each side in its own subprocess: fp32 on both sides,
and mixed precision (ours --precision bf16, Hugging Face under torch.autocast bf16); with
--strategy mirrored, our step under tf.distribute's MirroredStrategy on this machine's one device
beside the plain one (its overhead).

    flock /tmp/gpt2-bench.lock /work/main/.venv/bin/python bench/train.py

Prints tokens/s, peak RSS, the ratio to Hugging Face, and the fraction of the FLOP-bound rate
(training FLOPs per token against this machine's measured fp32 matmul rate).
"""
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _our_step(batch, seq, recompute=False, jit_compile=None, precision='fp32', layerwise=False,
              strategy='none'):
    # -> step(i): train.py's step i (1-based) on a random global batch, from fresh 124M weights.
    import numpy as np
    from gpt2 import distribute, hparams as hparams_lib, model, settings
    from gpt2 import layerwise as layerwise_lib, step as step_lib
    strategy = distribute.make_strategy(strategy)
    if jit_compile is None:   # as train.py decides
        jit_compile = settings.compiles_train_step(precision)
    hp = hparams_lib.PRESETS['124M']
    with distribute.scope(strategy):
        state = step_lib.TrainState(hp, model.init_params(hp, seed=0), 'adamw')
    if layerwise:
        step = layerwise_lib.make_layerwise_step(hp, 'adamw', weight_decay=0.01,
                                                 precision=precision, jit_compile=jit_compile)
    else:
        step = step_lib.make_train_step(hp, 'adamw', weight_decay=0.01, recompute=recompute,
                                        precision=precision, jit_compile=jit_compile,
                                        strategy=strategy)
    rng = np.random.default_rng(0)
    return lambda i: float(step(state, rng.integers(0, hp.n_vocab, [1, batch, seq + 1]).astype(
        np.int32), 1e-4, i, [0, i]))


def ours(batch, seq, steps, warmup, **kw):
    step = _our_step(batch, seq, **kw)
    for i in range(warmup):
        step(i + 1)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i + 1)
    return batch * seq * steps / (time.perf_counter() - t0)


def mirrored_over_plain(batch, seq, steps, warmup):
    """The median over `steps` pairs of (a plain step's time / a mirrored step's time), the two
    steps alternating in one process, so a drift of the machine's speed falls on both alike."""
    plain, mirrored = _our_step(batch, seq), _our_step(batch, seq, strategy='mirrored')
    ratios = []
    for i in range(warmup + steps):
        took = []
        for step in (plain, mirrored):
            t0 = time.perf_counter()
            step(i + 1)
            took.append(time.perf_counter() - t0)
        if i >= warmup:
            ratios.append(took[0] / took[1])
    return sorted(ratios)[len(ratios) // 2]


def hf(batch, seq, steps, warmup, bf16=False):
    import contextlib
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, activation_function='gelu_new')
    net = transformers.GPT2LMHeadModel(cfg)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)

    def one():
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        # Labels are the input shifted by one, as in ours: seq predictions per row.
        with (torch.autocast('cpu', dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            out = net(input_ids=x[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                out.logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    for _ in range(warmup):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return batch * seq * steps / (time.perf_counter() - t0)


def matmul_gflops():
    """The machine's fp32 matmul rate through TensorFlow (the FLOP-bound ceiling)."""
    import tensorflow as tf
    a = tf.random.normal([3072, 3072])
    f = tf.function(lambda x: tf.matmul(x, x))
    f(a).numpy()
    best = 0
    for _ in range(5):  # the best of 5: other work on the machine only slows it down
        t0 = time.perf_counter()
        for _ in range(3):
            f(a).numpy()
        best = max(best, 2 * 3072 ** 3 * 3 / (time.perf_counter() - t0) / 1e9)
    return best


def train_flops_per_token(seq, n_layer=12, d=768, n_vocab=50257):
    # 6 FLOPs per matmul weight per token (forward 2, backward 4), the tied output layer included,
    # plus attention's scores and weighted sum (4 * seq * d per layer forward, causal not skipped).
    return 6 * (12 * n_layer * d * d + n_vocab * d) + 3 * 4 * n_layer * seq * d


def worker(args):
    side, batch, seq, steps, warmup = args[0], *map(int, args[1:5])
    if side in ('hf', 'hf-bf16'):
        tps = hf(batch, seq, steps, warmup, bf16=side == 'hf-bf16')
    elif side == 'gflops':
        tps = matmul_gflops()
    elif side == 'mirrored-over-plain':
        tps = mirrored_over_plain(batch, seq, steps, warmup)
    else:
        # ours: the default step (XLA); ours-recompute: --memory_saving_gradients;
        # ours-noxla: TF's own kernels (--nojit_compile); ours-bf16: --precision bf16 (on a
        # CPU: TF's kernels), ours-bf16-xla: the same under XLA; ours-layerwise: --layerwise;
        # ours-mirrored: --strategy mirrored.
        tps = ours(batch, seq, steps, warmup, recompute=side == 'ours-recompute',
                   jit_compile={'ours-noxla': False, 'ours-bf16-xla': True}.get(side),
                   precision='bf16' if side.startswith('ours-bf16') else 'fp32',
                   layerwise=side == 'ours-layerwise',
                   strategy='mirrored' if side == 'ours-mirrored' else 'none')
    print(json.dumps({'value': tps, 'rss': _peak_rss_gib()}))


def run(side, batch=0, seq=0, steps=0, warmup=0):
    out = subprocess.run([sys.executable, __file__, '--worker', side, str(batch), str(seq),
                          str(steps), str(warmup)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f'{side} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(shapes='1x1024,4x256', steps=4, warmup=2, sides='ours,ours-recompute,hf',
         strategy=None):
    """--sides from ours, ours-recompute, ours-layerwise, ours-noxla, ours-bf16, ours-bf16-xla,
    ours-mirrored, hf, hf-bf16
    (ratios are to hf, for the bf16 sides also to hf-bf16, for ours-mirrored also to ours);
    --strategy mirrored adds ours-mirrored (and ours) to the sides, and the two alternated in
    one process."""
    gflops = run('gflops')['value']
    print(f'fp32 matmul rate: {gflops:.0f} GFLOP/s')
    # fire hands a comma list over as a tuple, a single item as a string
    as_list = lambda v: v.split(',') if isinstance(v, str) else list(v)  # noqa: E731
    if strategy is not None:
        if strategy != 'mirrored':
            raise SystemExit('bench/train.py --strategy: only mirrored runs on one machine')
        sides = list(dict.fromkeys(['ours', *as_list(sides), 'ours-mirrored']))
    for shape in as_list(shapes):
        batch, seq = map(int, shape.split('x'))
        bound = gflops * 1e9 / train_flops_per_token(seq)
        res = {s: run(s, batch, seq, steps, warmup) for s in as_list(sides)}
        print(f'\n{batch} x {seq} (FLOP-bound rate {bound:.0f} tokens/s)')
        for s, r in res.items():
            ratio = f'{r["value"] / res["hf"]["value"]:.2f}x HF' if 'hf' in res else ''
            if 'bf16' in s and 'hf-bf16' in res:
                ratio += f' {r["value"] / res["hf-bf16"]["value"]:.2f}x HF-bf16'
            if s == 'ours-mirrored' and 'ours' in res:
                ratio += f' {r["value"] / res["ours"]["value"]:.3f}x ours'
            print(f'  {s:15s} {r["value"]:7.1f} tokens/s  peak RSS {r["rss"]:.2f} GiB  '
                  f'{ratio:22s} {r["value"] / bound:.0%} of FLOP-bound')
        if strategy is not None:
            r = run('mirrored-over-plain', batch, seq, steps, warmup)['value']
            print(f'  ours-mirrored / ours, the steps alternating in one process: {r:.3f}x '
                  f'(median of {steps})')


if __name__ == '__main__':
    if sys.argv[1:2] == ['--worker']:
        worker(sys.argv[2:])
    else:
        import fire
        fire.Fire(main)
