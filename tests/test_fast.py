"""gpt2/fast.py against the plain math of gpt2/model.py: with every speed trick on, and with
fast.plain(), the logits, a cached decode, the loss and its gradients are the same.

Checked once by breaking fast.py: blocked attention seeing every key (logits 0.70 apart), the
gelu gradient's 0.044715 as 0.04 and the fused loss's wte gradient off by 0.1% (worst gradient
0.91 apart) each fail."""
import collections

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import fast
from gpt2 import model
from gpt2 import sampling
from gpt2 import step as step_lib
from tests.helpers import lively_params, tokens_for

TOL = 1e-5  # relative: max |fast - plain| / max |plain| (measured about 1e-7, printed)


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of each fast twin, so a test can show the fast run really took them."""
    counts = collections.Counter()
    for fn in fast.TWINNED:
        def counted(*args, _twin=fn.twin, _name=fn.__name__, **kw):
            counts[_name] += 1
            return _twin(*args, **kw)
        monkeypatch.setattr(fn, 'twin', counted)
    return counts


def _both(fn):
    """fn() with the tricks on, then under fast.plain(); fn builds (and so traces) its own
    functions, so the switch is read afresh."""
    fast_out = fn()
    with fast.plain():
        plain_out = fn()
    return fast_out, plain_out


@pytest.fixture
def setup(tiny, monkeypatch):
    monkeypatch.setattr(fast, 'ATTN_BLOCK', 8)  # blocked causal attention over n_ctx=32
    monkeypatch.setattr(fast, 'LOSS_ROWS', 24)  # the fused loss in 3 blocks, the last padded
    return tiny, lively_params(tiny, 3)


def test_logits_are_the_same(setup, calls):
    hp, p = setup
    toks = tokens_for(hp, 2, hp.n_ctx, seed=1)

    def logits():
        f = tf.function(lambda p, t: model.forward(hp, p, t)[0], jit_compile=True)
        return f(model.to_tensors(p), toks).numpy()
    got, ref = _both(logits)
    print(f'\nlogits, fast against plain: relative difference {_relative(got, ref):.1e}')
    assert _relative(got, ref) <= TOL
    assert calls['attend'] and calls['norm'] and calls['gelu']


@pytest.mark.slow
def test_cached_decode_is_the_same(setup, calls):
    hp, p = setup
    toks = tokens_for(hp, 3, 20, seed=2)

    def decode():
        fn = model.make_forward(hp, jit_compile=True)
        tree = fast.for_decoding(p)
        cache = model.empty_cache(hp, 3, 24)
        logits, cache = fn(tree, toks[:, :5], cache, 0)
        out = [logits]
        for i in range(5, toks.shape[1]):
            logits, cache = fn(tree, toks[:, i:i + 1], cache, i)
            out.append(logits)
        return tf.concat(out, 1).numpy(), [c.numpy() for c in cache]
    (got, got_cache), (ref, ref_cache) = _both(decode)
    diff = max([_relative(got, ref)] + [_relative(a, b) for a, b in zip(got_cache, ref_cache)])
    print(f'\ncached decode (logits and cache), fast against plain: relative difference {diff:.1e}')
    assert diff <= TOL
    # The decode layout, the few-row products, the in-place write and one-query attention ran.
    assert {'linear', 'unembed', 'write_cache', 'attend'} <= set(calls)


@pytest.mark.slow
@pytest.mark.parametrize('recompute', [False, True])
def test_loss_and_gradients_are_the_same(setup, calls, recompute):
    hp, p = setup
    windows = tokens_for(hp, 2, hp.n_ctx + 1, seed=3)

    def loss_and_grads():
        f = tf.function(lambda p, w: step_lib.loss_and_grads(hp, p, w, recompute=recompute),
                        jit_compile=True)
        loss, grads = f(model.to_tensors(p), windows)
        return float(loss), {k: g.numpy() for k, g in grads.items()}
    (loss, grads), (ref_loss, ref_grads) = _both(loss_and_grads)
    worst = max((np.linalg.norm(grads[k] - ref_grads[k]) / np.linalg.norm(ref_grads[k]), k)
                for k in ref_grads)
    print(f'\nloss {loss:.6f} vs {ref_loss:.6f}; worst gradient relative error {worst[0]:.1e} '
          f'({worst[1]})')
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    assert set(grads) == set(checkpoint.flatten(p))
    assert worst[0] <= 10 * TOL
    assert calls['cross_entropy'] and calls['gelu'] and calls['norm']


def test_plain_takes_no_twin(setup, calls):
    hp, p = setup
    with fast.plain():
        tree = fast.for_decoding(p)
        model.forward(hp, tree, tokens_for(hp, 1, hp.n_ctx))
        assert fast.recomputed(model.block) is model.block
    assert not calls and 'w_t' not in tree['h'][0]['attn']['c_attn']


def _scaled(out):
    # every float tensor of a result, times 1.5: what a wrong twin might give
    return tf.nest.map_structure(lambda t: t * 1.5 if t.dtype.is_floating else t, out)


@pytest.mark.parametrize('fn', fast.TWINNED, ids=lambda fn: fn.__name__)
def test_the_plain_switch_covers_every_twin_of_a_built_decoder_and_step(setup, monkeypatch, fn):
    """With one twin broken, what fast.plain() builds gives exactly what it gave before: a
    decoder (also when one built without the switch is cached) and a train step (also when it is
    first traced after the block); built without it, the decode or the loss changes (so the twin
    ran)."""
    hp, p = setup
    windows = tokens_for(hp, 2, hp.n_ctx + 1, seed=3)

    def decode(fresh=True):
        if fresh:
            sampling.make_decoder.cache_clear()
        return sampling.generate(hp, p, prompts=[[1, 2], [3]], nsamples=2, batch_size=2,
                                 length=12, temperature=1.0, top_k=5, top_p=0.8, seed=4,
                                 repetition_penalty=1.2, jit_compile=False)

    def make_step():
        return fast.function(lambda p, w: step_lib.loss_and_grads(hp, p, w)[0])

    def loss(step):
        return float(step(model.to_tensors(p), windows))
    with fast.plain():
        plain_ref = decode(), loss(make_step())
    fast_ref = decode(), loss(make_step())
    twin = fn.twin
    monkeypatch.setattr(fn, 'twin', lambda *a, **k: _scaled(twin(*a, **k)))
    broken = decode(), loss(make_step())   # (and the broken fast decoder stays cached)
    with fast.plain():
        tokens = decode(fresh=False)
        step = make_step()
    assert (tokens, loss(step)) == plain_ref
    assert broken != fast_ref, fn.__name__
