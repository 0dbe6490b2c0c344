"""gpt2/layerwise.py's make_layerwise_step and the memory it saves: the same update as the whole
step (step.make_train_step), each piece compiled once for every block, exact resume through
train(), and TrainState taking the weights without a second copy. The settings it refuses are
tests/test_settings.py's; its peak memory is measured in bench/memory.py (BENCHMARKS.md)."""
import numpy as np
import pytest

from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import layerwise
from gpt2 import model
from gpt2 import runs
from gpt2 import step as step_lib
from tests import helpers

LR = 1e-3


def _steps(hp, kind, optimizer, *, n=1, noise=0.0, precision='fp32', jit_compile=True,
           only_transformer=False, steps=3):
    state = step_lib.TrainState(hp, model.init_params(hp, seed=1), optimizer,
                                only_transformer=only_transformer)
    make = layerwise.make_layerwise_step if kind == 'layerwise' else step_lib.make_train_step
    step = make(hp, optimizer, weight_decay=0.01, noise=noise, precision=precision,
                jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    losses = [float(step(state, rng.integers(0, hp.n_vocab, [n, 2, 17]).astype(np.int32), LR,
                         t + 1, [0, t])) for t in range(steps)]
    return losses, helpers.leaves(state.params), step


@pytest.mark.parametrize('optimizer, opts', [
    ('sgd', {'n': 2, 'noise': 0.1}),
    ('sgd', {'precision': 'bf16', 'jit_compile': False}),
    ('adam', {'only_transformer': True}),
    ('adafactor', {'n': 2}),
], ids=['sgd-accumulate-noise', 'sgd-bf16-tf-kernels', 'adam-frozen-embeddings',
        'adafactor-accumulate'])
@pytest.mark.slow
def test_layerwise_step_equals_the_whole_step(tiny, optimizer, opts):
    """Three steps each way from the same weights on the same batches. SGD's update is the
    gradient itself, so its weights agree to float32 rounding; Adam's and Adafactor's divide by
    the gradient's own size, so they are compared in units of the learning rate. The key part of
    c_attn's bias has a gradient that is zero but for rounding (softmax ignores a shift shared by
    every key), which Adafactor's normalised update turns into steps of any sign: it is left out
    for Adafactor.

    Breaks caught (each verified): every block updated with block 0's slots, the head's share
    of wte's gradient dropped, the micro-batches' gradients not summed, noise drawn differently."""
    whole = _steps(tiny, 'whole', optimizer, **opts)
    layer = _steps(tiny, 'layerwise', optimizer, **opts)
    # bf16 rounds each product's inputs: another order of the same sums moves the last bits
    low = opts.get('precision') == 'bf16'
    assert layer[0] == pytest.approx(whole[0], rel=1e-4 if low else 1e-6)
    d = tiny.n_embd
    start = helpers.leaves(model.init_params(tiny, seed=1))
    worst = {}
    for k, a in whole[1].items():
        b, a0 = layer[1][k], start[k]
        if optimizer == 'adafactor' and k.endswith('attn/c_attn/b'):
            a, b, a0 = (np.delete(x, np.s_[d:2 * d]) for x in (a, b, a0))
        # SGD: against the leaf's largest change over the steps; the others: learning rates
        scale = np.abs(a - a0).max() if optimizer == 'sgd' else LR
        worst[k] = float(np.abs(a - b).max() / max(scale, 1e-12))
    k = max(worst, key=worst.get)
    print(f'{optimizer} {opts}: largest difference {worst[k]:.2e} '
          f'({"of the change" if optimizer == "sgd" else "learning rates"}, {k})')
    assert worst[k] < (5e-2 if low else 1e-3 if optimizer == 'sgd' else 0.05), (k, worst[k])
    if opts.get('only_transformer'):
        assert all(np.array_equal(layer[1][k], start[k])
                   for k in ('model/wte', 'model/wpe', 'model/ln_f/g', 'model/ln_f/b'))
    else:
        assert not np.array_equal(layer[1]['model/wte'], start['model/wte'])


def test_each_piece_compiles_once_for_every_block():
    hp = hparams_lib.HParams(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=5)
    *_, step = _steps(hp, 'layerwise', 'adam', steps=3)
    # the forward block, the head, the embedding's gradients, the block's backward and update
    assert step.tracing_count() == 4


@pytest.mark.slow
def test_layerwise_training_resumes_bit_for_bit(tmp_path, tiny):
    data = helpers.npz(tmp_path / 'data.npz', helpers.pattern())
    opts = dict(layerwise=True, noise=0.1, optimizer='adamw', accumulate_gradients=2)
    a = helpers.train_tiny(tmp_path, tiny, data, steps=6, run_name='a', **opts)
    helpers.train_tiny(tmp_path, tiny, data, steps=3, run_name='b', **opts)
    b = helpers.train_tiny(tmp_path, tiny, data, steps=6, run_name='b', **opts)
    assert b['losses'] == a['losses'][3:] and a['losses'][-1] < a['losses'][0]
    pa, pb = (helpers.leaves(checkpoint.load_params(x['prefix'])[0]) for x in (a, b))
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    (_, sa), (_, sb) = (runs.load_state(x['prefix']) for x in (a, b))
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_train_state_can_take_the_weights_without_a_copy(tiny):
    tree = model.init_params(tiny, seed=2)
    want = helpers.leaves(tree)
    state = step_lib.TrainState(tiny, tree, 'sgd', consume=True)
    assert all(v is None for v in checkpoint.flatten(tree).values())   # the tree let go
    got = helpers.leaves(state.params)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    kept = model.init_params(tiny, seed=2)
    step_lib.TrainState(tiny, kept, 'sgd')
    assert all(isinstance(v, np.ndarray) for v in checkpoint.flatten(kept).values())
