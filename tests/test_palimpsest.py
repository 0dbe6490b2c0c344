"""The palimpsest sampler: plans, checkpoint naming and loading, swaps checked against oracles."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint, hparams as hparams_lib, model, palimpsest, sampling, settings
from gpt2.errors import UserError
from tests.conftest import run_sample_py
from tests.helpers import sharp


@pytest.fixture
def run(tiny, tmp_path):
    """checkpoint/run1 with model-60, model-200, model-400 (different seeds = moments)."""
    folder = tmp_path / 'checkpoint' / 'run1'
    for k, step in enumerate((60, 200, 400)):
        checkpoint.save_params(sharp(tiny, seed=k), str(folder / f'model-{step}'), hparams=tiny)
    return folder


def store_and_prefixes(tiny, run):
    store = palimpsest.Store(tiny)
    return store, [str(run / f'model-{s}') for s in (60, 200, 400)]


def full_logits(hp, params, toks):
    logits, _ = model.forward(hp, params, tf.constant([toks], tf.int32))
    return logits[0, -1].numpy()


CONTROLS = dict(top_k=0, top_p=1.0, seed=9)


def controls(**kw):
    return settings.SampleSettings(**CONTROLS, **kw)


# ---- plans and names ----

def test_parse_schedule_and_errors():
    assert palimpsest.parse_schedule('0:model-60, 40:model-200') == [(0, 'model-60'),
                                                                      (40, 'model-200')]
    for bad, want in (('5:a', 'start at position 0'), ('0:a,0:b', 'increase'),
                      ('0:a,x:b', 'POSITION:CHECKPOINT'), ('0:a,,3:b', 'empty entry')):
        with pytest.raises(UserError, match=want):
            palimpsest.parse_schedule(bad)


def test_cycle_walk_and_blend_plans():
    assert palimpsest.cycle_plan(['a', 'b'], 3, 10) == [(0, 'a'), (3, 'b'), (6, 'a'), (9, 'b')]
    assert palimpsest.walk_plan(['a', 'b', 'c'], 5) == [(0, 'a'), (5, 'b'), (10, 'c')]
    assert palimpsest.parse_blend('a:1,b:3') == [('a', 0.25), ('b', 0.75)]
    assert palimpsest.parse_blend(('a:1', 'b:1'))[0] == ('a', 0.5)
    with pytest.raises(UserError, match='weight'):
        palimpsest.parse_blend('a:-1,b:2')
    with pytest.raises(UserError, match='--every'):
        palimpsest.cycle_plan(['a'], 0, 10)


def test_names_by_step_or_path(run):
    p = str(run / 'model-200')
    assert palimpsest.resolve_name('200', str(run)) == p
    assert palimpsest.resolve_name('model-200', str(run)) == p
    assert palimpsest.resolve_name(p) == p
    with pytest.raises(UserError, match='model-60, model-200, model-400'):
        palimpsest.resolve_name('300', str(run))
    assert [os.path.basename(x) for x in palimpsest.all_steps(str(run))] == [
        'model-60', 'model-200', 'model-400']


def test_odd_hparams_are_named(tiny, run, tmp_path):
    other = hparams_lib.HParams(n_vocab=97, n_ctx=32, n_embd=16, n_head=4, n_layer=2)
    odd = str(tmp_path / 'checkpoint' / 'run2' / 'model-10')
    checkpoint.save_params(model.init_params(other, seed=0), odd, hparams=other)
    assert palimpsest.check_same_hparams([str(run / 'model-60')]) == tiny
    with pytest.raises(UserError, match='run2/model-10 has hparams'):
        palimpsest.check_same_hparams([str(run / 'model-60'), odd])


def test_store_loads_lazily_within_budget(tiny, run):
    _, prefixes = store_and_prefixes(tiny, run)
    size = sum(np.asarray(x).nbytes for x in tf.nest.flatten(model.init_params(tiny)))
    store = palimpsest.Store(tiny, budget_mb=1.5 * size / (1 << 20))   # room for one tree
    assert store.loads == 0
    store.get(prefixes[0])
    store.get(prefixes[0])
    assert store.loads == 1
    store.get(prefixes[1])
    assert list(store.trees) == [prefixes[1]]
    store.get(prefixes[0])
    assert store.loads == 3


# ---- swaps against oracles ----

def test_one_checkpoint_schedule_equals_plain_sampling(tiny, run):
    store, prefixes = store_and_prefixes(tiny, run)
    out = palimpsest.sample(tiny, [(0, prefixes[0])], store,
                            controls(batch_size=2, length=20, temperature=1.0),
                            prompts=[[1, 2]] * 2)
    plain = sampling.generate(tiny, store.get(prefixes[0]), prompts=[[1, 2]] * 2, nsamples=2,
                              batch_size=2, length=20, temperature=1.0, **CONTROLS)
    assert out['tokens'] == plain


def test_recompute_greedy_tokens_are_each_spans_checkpoint_under_full_forward(tiny, run):
    store, prefixes = store_and_prefixes(tiny, run)
    plan = [(0, prefixes[0]), (5, prefixes[1]), (9, prefixes[2])]
    out = palimpsest.sample(tiny, plan, store, controls(length=14, temperature=0),
                            prompts=[[3, 4, 5]], cache='recompute')
    toks = [3, 4, 5]
    for i, new in enumerate(out['tokens'][0]):
        prefix = [p for pos, p in plan if pos <= i][-1]
        assert new == int(np.argmax(full_logits(tiny, store.get(prefix), toks))), i
        toks.append(new)
    assert out['stretches'][0] == [(0, 5, prefixes[0]), (5, 9, prefixes[1]),
                                   (9, 14, prefixes[2])]


def test_keep_mode_cache_holds_the_old_checkpoints_keys_and_values(tiny, run):
    store, prefixes = store_and_prefixes(tiny, run)
    a, b = store.get(prefixes[0]), store.get(prefixes[1])
    controls = sampling.make_controls(tiny, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                      seed=0)
    dec = sampling.Decoder(tiny, 1, 32, chunk=8)
    dec.prefill((a,), [[3, 4, 5]], row_ids=[0])
    first = dec.run((a,), 6, controls)[0].tolist()
    dec.run((b,), 6, controls)
    text = [3, 4, 5] + first
    # Slots 0..7 were written while A read the prompt and its own six tokens.
    _, cache_a = model.forward(tiny, a, tf.constant([text[:-1]]),
                               cache=model.empty_cache(tiny, 1, 32))
    _, cache_b = model.forward(tiny, b, tf.constant([text[:-1]]),
                               cache=model.empty_cache(tiny, 1, 32))
    n = len(text) - 1
    kept, cache_a, cache_b = [np.stack([c[..., :n, :] for c in cache])
                              for cache in (dec.state['caches'][0], cache_a, cache_b)]
    assert np.allclose(kept, cache_a, atol=1e-5)
    assert not np.allclose(kept, cache_b, atol=1e-3)


def test_keep_and_recompute_write_different_texts(tiny, run):
    store, prefixes = store_and_prefixes(tiny, run)
    plan = [(0, prefixes[0]), (4, prefixes[1])]
    s = controls(length=16, temperature=0)
    kw = dict(prompts=[[7, 8, 9, 10, 11, 12]])
    keep = palimpsest.sample(tiny, plan, store, s, cache='keep', **kw)['tokens'][0]
    again = palimpsest.sample(tiny, plan, store, s, cache='recompute', **kw)['tokens'][0]
    assert keep[:4] == again[:4]          # the same checkpoint wrote the first span
    assert keep != again


def test_blend_with_weight_one_equals_that_checkpoint(tiny, run):
    store, prefixes = store_and_prefixes(tiny, run)
    s = controls(batch_size=2, length=12, temperature=1.0)
    kw = dict(prompts=[[1, 2]] * 2)
    blended = palimpsest.sample(tiny, None, store, s,
                                blend=[(prefixes[1], 1.0), (prefixes[2], 0.0)], **kw)
    alone = palimpsest.sample(tiny, [(0, prefixes[1])], store, s, **kw)
    assert blended['tokens'] == alone['tokens']
    mixed = palimpsest.sample(tiny, None, store, s,
                              blend=[(prefixes[1], 0.5), (prefixes[2], 0.5)], **kw)
    assert mixed['tokens'] != alone['tokens']


def test_swaps_do_not_retrace(tiny, run):
    store, prefixes = store_and_prefixes(tiny, run)
    sampling.make_decoder.cache_clear()
    plan = palimpsest.cycle_plan(prefixes, 3, 30)
    out = palimpsest.sample(tiny, plan, store, controls(length=30, temperature=1.0),
                            prompts=[[1]])
    assert len(out['stretches'][0]) == 10      # nine swaps among three checkpoints
    assert out['tracing_count'] == 1


def test_annotate_marks_stretches(tiny):
    decode = lambda ids: ''.join(chr(97 + t % 26) for t in ids)  # noqa: E731
    text, records = palimpsest.annotate([0, 1, 2, 3, 4], [(0, 2, 'r/model-60'),
                                                          (2, 5, 'r/model-200')], decode)
    assert text == '[[model-60]]ab[[model-200]]cde'
    assert records[1] == {'checkpoint': 'r/model-200', 'tokens': [2, 5], 'chars': [2, 5],
                          'text': 'cde'}


# ---- sample.py palimpsest ----

@pytest.fixture
def vocab_run(tmp_path):
    hp = hparams_lib.HParams(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
    folder = tmp_path / 'checkpoint' / 'r'
    for k, step in enumerate((60, 200)):
        checkpoint.save_params(model.init_params(hp, seed=k), str(folder / f'model-{step}'),
                               hparams=hp)
    return tmp_path


def _run(argv, capsys, monkeypatch):
    return run_sample_py(['palimpsest', *argv], capsys, monkeypatch)


def test_cli_palimpsest_annotates_and_names_output(vocab_run, capsys, monkeypatch):
    d = vocab_run
    base = ['--checkpoint_dir', str(d / 'checkpoint'), '--run_name', 'r', '--length', '8',
            '--seed', '4', '--temperature', '0.9', '--samples_dir', str(d / 'samples'),
            '--xla', 'False', '--quiet']
    code, out, err = _run(base + ['--schedule', '0:60,4:model-200', '--annotate'], capsys,
                          monkeypatch)
    assert code == 0, err
    assert '[[model-60]]' in out and '[[model-200]]' in out
    names = sorted(os.listdir(d / 'samples'))
    assert len(names) == 2 and all('seed4-t0.9' in n for n in names)
    meta = json.loads((d / 'samples' / names[0]).read_text())
    assert meta['seed'] == 4 and [s['tokens'] for s in meta['samples'][0]['spans']] == [[0, 4],
                                                                                        [4, 8]]
    code, _, err = _run(base + ['--steps', 'all', '--every', '3'], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = _run(base + ['--blend', 'model-60:0.5,200:0.5'], capsys, monkeypatch)
    assert code == 0, err


def test_cli_palimpsest_errors(vocab_run, capsys, monkeypatch):
    base = ['--checkpoint_dir', str(vocab_run / 'checkpoint'), '--run_name', 'r']
    for argv, want in ((['--schedule', '0:99'], "no checkpoint '99'"),
                       (['--cycle', '60,200'], '--every'),
                       (['--schedule', '0:60', '--cache', 'sometimes'], 'keep or recompute'),
                       ([], 'exactly one of')):
        code, _, err = _run(base + argv, capsys, monkeypatch)
        assert code == 1 and want in err and len(err.strip().splitlines()) == 1, err
