"""gpt2/runs.py: where a run's weights start from (--restore_from a path, fresh), resuming exactly,
and what stays on disk: the newest --max_checkpoints, the optimizer slots in the newest checkpoint
only (--keep_optimizer_state), a crash while trimming them leaving every checkpoint loadable."""
import os

import numpy as np
import pytest

from gpt2 import checkpoint
from gpt2 import dataset
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2 import runs
from gpt2 import settings
from gpt2.errors import UserError
from tests import helpers


@pytest.fixture
def data(tmp_path):
    return helpers.npz(tmp_path / 'data.npz', helpers.pattern())


def _train_without_xla(tmp_path, tiny, data, **kw):
    """helpers.train_tiny on TensorFlow's kernels (XLA's compile would be most of the time)."""
    return helpers.train_tiny(tmp_path, tiny, data, **{'jit_compile': False, **kw})


def _sidecar(prefix):
    meta, slots = runs.load_state(prefix)
    return meta, {k for k in slots if k.startswith('slot/')}


# ---------------------------------------------------------------- where the weights start from

@pytest.mark.slow
def test_resume_is_bit_for_bit(tmp_path, tiny, data):
    # (A decaying schedule's horizon is --steps, so here the rate is constant after warmup.)
    opts = dict(noise=0.1, warmup_steps=12, max_grad_norm=1.0, optimizer='adamw')
    a = helpers.train_tiny(tmp_path, tiny, data, steps=20, run_name='a', **opts)
    b1 = helpers.train_tiny(tmp_path, tiny, data, steps=10, run_name='b', **opts)
    b2 = helpers.train_tiny(tmp_path, tiny, data, steps=20, run_name='b', **opts)
    assert b2['losses'] == a['losses'][10:] and b1['losses'] == a['losses'][:10]
    pa, pb = helpers.leaves(checkpoint.load_params(a['prefix'])[0]), helpers.leaves(
        checkpoint.load_params(b2['prefix'])[0])
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    (ma, sa), (mb, sb) = (runs.load_state(x['prefix']) for x in (a, b2))
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert ma['samplers'] == mb['samplers'] and ma['step'] == mb['step'] == 20


def test_restore_from_a_path_and_fresh_load_those_weights(tmp_path, tiny, data):
    """Run 'a' fine-tunes a model folder (random weights, unlike the from-scratch init) for 4 sgd
    steps, saving at 2 and 4. --restore_from a/model-2 into run 'c' resumes there: its first
    loss is the loss of model-2's weights on step 2's batch (recomputed here in NumPy), which is
    neither the model's nor the run's latest checkpoint's on that batch. --restore_from fresh on
    run 'a' starts from the model at step 0 (not from a/model-4): its losses are the first run's
    first two, its first one the model's loss on the first batch.

    Breaks caught (each verified): fresh treated as latest, fresh loading the latest checkpoint's
    weights at step 0, a path ignored in favour of the model, a path's folder resolved to its
    latest checkpoint."""
    models = tmp_path / 'models'
    base = helpers.random_tree(tiny, 6)
    checkpoint.save_params(base, str(models / 'm' / 'model.ckpt'), hparams=tiny)
    opts = dict(from_scratch=False, hparams=None, model_name='m', models_dir=str(models),
                optimizer='sgd', learning_rate=0.3, jit_compile=False)
    batches = dataset.Sampler(dataset.load_npz(data), 17, seed=0)
    batches = [batches.batch(2) for _ in range(4)]  # what run 'a' trains on, step by step
    first = helpers.train_tiny(tmp_path, tiny, data, steps=4, save_every=2, run_name='a', **opts)
    run = first['run_dir']
    model2 = checkpoint.load_params(os.path.join(run, 'model-2'))[0]
    model4 = checkpoint.load_params(os.path.join(run, 'model-4'))[0]
    assert first['losses'][0] == pytest.approx(helpers.mean_loss(tiny, base, batches[0]), rel=1e-5)

    again = helpers.train_tiny(tmp_path, tiny, data, steps=4, run_name='c',
                               restore_from=os.path.join(run, 'model-2'), **opts)
    assert len(again['losses']) == 2 and again['prefix'].endswith(os.path.join('c', 'model-4'))
    on2 = {name: helpers.mean_loss(tiny, tree, batches[2])
           for name, tree in (('model-2', model2), ('model-4', model4), ('base', base))}
    assert again['losses'][0] == pytest.approx(on2['model-2'], rel=1e-5), on2
    assert min(abs(on2['model-2'] - on2[k]) for k in ('model-4', 'base')) > 1e-3, on2
    assert again['losses'] == pytest.approx(first['losses'][2:], rel=1e-6)

    fresh = helpers.train_tiny(tmp_path, tiny, data, steps=2, run_name='a', restore_from='fresh',
                               **opts)
    assert fresh['step'] == 2 and fresh['losses'] == pytest.approx(first['losses'][:2], rel=1e-6)
    on0 = {name: helpers.mean_loss(tiny, tree, batches[0])
           for name, tree in (('base', base), ('model-4', model4))}
    assert fresh['losses'][0] == pytest.approx(on0['base'], rel=1e-5), on0
    assert abs(on0['base'] - on0['model-4']) > 1e-3, on0


def test_start_reads_each_hparams_json_once(tmp_path, tiny, monkeypatch):
    """runs.start from a model folder reads its hparams.json once; resuming the run's own
    checkpoint reads the run's hparams.json (beside that checkpoint, and the run folder's) once.

    Break caught (verified): start as it was (the model folder's read twice, the run's three
    times)."""
    models = tmp_path / 'models'
    checkpoint.save_params(model.init_params(tiny), str(models / 'm' / 'model.ckpt'), hparams=tiny)
    reads, real = [], hparams_lib.load
    monkeypatch.setattr(hparams_lib, 'load', lambda path: reads.append(path) or real(path))
    s = settings.TrainSettings(dataset='x', model_name='m', models_dir=str(models),
                               checkpoint_dir=str(tmp_path / 'ckpt'))
    hp, _, prefix, _ = runs.start(s)
    assert hp == tiny and prefix == str(models / 'm' / 'model.ckpt')
    assert reads == [str(models / 'm')]
    mine = checkpoint.save_params(model.init_params(tiny), os.path.join(runs.folder(s), 'model-2'),
                                  hparams=tiny)
    reads.clear()
    hp, _, prefix, _ = runs.start(s)
    assert hp == tiny and prefix == mine
    assert reads == [os.path.join(runs.folder(s), hparams_lib.FILENAME)]


# ---------------------------------------------------------------- what the checkpoints keep

def test_max_checkpoints_deletes_the_oldest(tmp_path, tiny, data):
    run = helpers.train_tiny(tmp_path, tiny, data, steps=8, save_every=2,
                             max_checkpoints=2)['run_dir']
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [6, 8]
    assert not [f for f in os.listdir(run) if f.startswith(('model-2', 'model-4'))]


def test_only_the_newest_checkpoint_keeps_the_optimizer_slots(tmp_path, tiny, data):
    """Catches: every sidecar keeping the slots (30 GB of Adam state for 20 saves at 124M), or
    the trimming losing the step and the samplers' state from the older sidecars."""
    run = _train_without_xla(tmp_path, tiny, data, steps=6, save_every=2)['run_dir']
    prefixes = checkpoint.list_checkpoints(run)
    assert [checkpoint.step_of(p) for p in prefixes] == [2, 4, 6]
    newest_meta, newest_slots = _sidecar(prefixes[-1])
    want = {f'slot/{s}/{k}' for k in checkpoint.shapes(tiny) for s in ('m', 'v')}
    assert newest_slots == want and not newest_meta.get('slots_dropped')
    size = os.path.getsize(prefixes[-1] + runs.SIDECAR_SUFFIX)
    for p, step in zip(prefixes[:-1], (2, 4)):
        meta, slots = _sidecar(p)
        assert slots == set() and meta['slots_dropped'] is True
        assert meta['step'] == step and meta['samplers'] and meta['datasets'] == [data]
        assert os.path.getsize(p + runs.SIDECAR_SUFFIX) < min(size / 10, 10_000)
        checkpoint.load_params(p)  # the weights are untouched


def test_resuming_from_an_older_checkpoint_restarts_only_the_optimizer(
        tmp_path, tiny, data, capsys):
    """Catches: an older checkpoint (its slots dropped) failing to resume ('optimizer state does
    not match'), resuming silently, or losing its step or data position along with the slots."""
    first = _train_without_xla(tmp_path, tiny, data, steps=6, save_every=2, run_name='a')
    older = os.path.join(first['run_dir'], 'model-4')
    capsys.readouterr()
    again = _train_without_xla(tmp_path, tiny, data, steps=6, save_every=2, run_name='b',
                               restore_from=older)
    out = capsys.readouterr()
    note = [line for line in (out.out + out.err).splitlines() if line.startswith('note:')]
    assert note == [f'note: {older} keeps no optimizer state (only the newest checkpoint of a '
                    'run does, unless --keep_optimizer_state all); the optimizer starts afresh, '
                    'the step and data position resume'], out
    assert again['step'] == 6 and len(again['losses']) == 2
    # The same windows were drawn as in the first run's steps 5 and 6: the samplers resumed.
    meta_a, _ = runs.load_state(first['prefix'])
    meta_b, slots_b = _sidecar(again['prefix'])
    assert meta_b['step'] == 6 and meta_b['samplers'] == meta_a['samplers']
    assert slots_b  # and its new checkpoint holds the fresh optimizer's slots


def test_keep_optimizer_state_all_keeps_every_checkpoints_slots(tmp_path, tiny, data):
    """Catches: --keep_optimizer_state all ignored (the slots dropped anyway), or a bad value
    accepted."""
    run = _train_without_xla(tmp_path, tiny, data, steps=6, save_every=2,
                             keep_optimizer_state='all')['run_dir']
    want = {f'slot/{s}/{k}' for k in checkpoint.shapes(tiny) for s in ('m', 'v')}
    for p in checkpoint.list_checkpoints(run):
        meta, slots = _sidecar(p)
        assert slots == want and 'slots_dropped' not in meta, p
    with pytest.raises(UserError, match=r"unknown --keep_optimizer_state 'newest': expected one "
                                        r"of latest, all"):
        _train_without_xla(tmp_path, tiny, data, steps=8, keep_optimizer_state='newest',
                           run_name='x')


class _Crash(BaseException):
    """A kill in the middle of a write (not an Exception, so nothing on the way catches it)."""


def test_a_crash_while_dropping_slots_leaves_every_checkpoint_loadable(tmp_path, tiny, data,
                                                                       monkeypatch):
    """Catches: the slots dropped in place (a crash half-way leaves an unreadable sidecar) or
    before the new checkpoint is named in the state file."""
    real_savez = np.savez
    run = os.path.join(tmp_path, 'ckpt', settings.TrainSettings.run_name)

    def savez(f, **arrays):
        if not any(k.startswith('slot/') for k in arrays):  # the rewrite without slots
            state = open(os.path.join(run, checkpoint.STATE_FILE)).read()
            assert state.startswith('model_checkpoint_path: "model-4"'), state
            real_savez(f, **arrays)
            f.truncate(f.tell() // 2)  # killed half-way through writing the file
            raise _Crash
        return real_savez(f, **arrays)

    monkeypatch.setattr(runs.np, 'savez', savez)
    with pytest.raises(_Crash):
        _train_without_xla(tmp_path, tiny, data, steps=6, save_every=2)
    monkeypatch.undo()
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [2, 4]
    assert checkpoint.resolve(run) == os.path.join(run, 'model-4')
    assert not [f for f in os.listdir(run) if f.endswith('.tmp')]
    for p in checkpoint.list_checkpoints(run):
        checkpoint.load_params(p)
        meta, slots = _sidecar(p)
        assert slots and meta['step'] == checkpoint.step_of(p)  # model-2's were never dropped
    # And the run resumes from the newest, dropping the older checkpoints' slots this time.
    out = _train_without_xla(tmp_path, tiny, data, steps=6, save_every=2)
    assert out['step'] == 6 and len(out['losses']) == 2
    kept = [bool(_sidecar(p)[1]) for p in checkpoint.list_checkpoints(run)]
    assert kept == [False, False, True]
