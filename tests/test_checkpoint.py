"""gpt2/checkpoint.py: OpenAI's names and shapes, the three path forms, clear errors, atomic saves."""
import os

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2.errors import UserError
from tests.conftest import OPENAI_117M, require_shared


def test_names_and_shapes_are_openais_117m():
    require_shared()
    hp = hparams_lib.load(OPENAI_117M)
    real = dict(tf.train.list_variables(os.path.join(OPENAI_117M, 'model.ckpt')))
    assert {k: list(v) for k, v in real.items()} == checkpoint.shapes(hp)
    flat = checkpoint.flatten(model.init_params(hp))
    assert set(flat) == set(real)
    assert all(list(flat[k].shape) == list(real[k]) for k in real)


def test_saved_dtypes_names_and_shapes_match_the_release_index(tmp_path, tiny):
    require_shared()
    hp = hparams_lib.load(OPENAI_117M)
    release = tf.train.load_checkpoint(os.path.join(OPENAI_117M, 'model.ckpt'))
    prefix = checkpoint.save_params(model.init_params(tiny), str(tmp_path / 'model-1'))
    ours = tf.train.load_checkpoint(prefix)
    assert set(ours.get_variable_to_dtype_map().values()) == {tf.float32}
    assert set(release.get_variable_to_dtype_map().values()) == {tf.float32}
    assert set(ours.get_variable_to_shape_map()) == set(checkpoint.shapes(tiny))
    assert len(checkpoint.shapes(hp)) == len(release.get_variable_to_shape_map())


def test_round_trip_and_path_forms(tmp_path, tiny):
    run = tmp_path / 'run1'
    p10, p20 = model.init_params(tiny, seed=10), model.init_params(tiny, seed=20)
    checkpoint.save_params(p10, str(run / 'model-10'), hparams=tiny)
    checkpoint.save_params(p20, str(run / 'model-20'), hparams=tiny)
    assert (run / 'hparams.json').is_file()
    assert checkpoint.list_checkpoints(str(run)) == [str(run / 'model-10'), str(run / 'model-20')]
    assert checkpoint.step_of(str(run / 'model-20')) == 20
    # A run folder means its latest checkpoint; a prefix means itself.
    loaded, hp, prefix = checkpoint.load_params(str(run))
    assert hp == tiny and prefix == str(run / 'model-20')
    for a, b in zip(tf.nest.flatten(loaded), tf.nest.flatten(p20)):
        np.testing.assert_array_equal(a, b)
    loaded, _, _ = checkpoint.load_params(str(run / 'model-10'))
    np.testing.assert_array_equal(loaded['wte'], p10['wte'])
    # The state file is TensorFlow's own format: TF finds the latest checkpoint through it.
    assert tf.train.latest_checkpoint(str(run)) == str(run / 'model-20')
    state = (run / 'checkpoint').read_text()
    assert state.startswith('model_checkpoint_path: "model-20"\n')
    assert 'all_model_checkpoint_paths: "model-10"' in state


def test_model_folder_in_openai_layout(tmp_path, tiny):
    folder = tmp_path / '124M'
    p = model.init_params(tiny, seed=1)
    checkpoint.save_params(p, str(folder / 'model.ckpt'), hparams=tiny)
    loaded, _, prefix = checkpoint.load_params(str(folder))
    assert prefix == str(folder / 'model.ckpt')
    np.testing.assert_array_equal(loaded['h'][1]['mlp']['c_proj']['w'], p['h'][1]['mlp']['c_proj']['w'])


def test_every_mismatch_is_reported_together(tmp_path, tiny):
    p = model.init_params(tiny)
    del p['h'][1]['ln_2']                       # two missing keys
    p['wpe'] = p['wpe'][:10]                    # a wrong shape
    p['extra'] = np.zeros(3, np.float32)        # an unexpected key
    checkpoint.save_params(p, str(tmp_path / 'model-1'))
    with pytest.raises(UserError) as e:
        checkpoint.load_params(str(tmp_path), hparams=tiny)
    msg = str(e.value)
    assert '2 missing' in msg and 'model/h1/ln_2/b' in msg and 'model/h1/ln_2/g' in msg
    assert '1 unexpected (model/extra)' in msg
    assert 'model/wpe is [10, 32], expected [32, 32]' in msg
    assert '\n' not in msg


def test_hparams_that_do_not_match_the_weights(tmp_path, tiny):
    checkpoint.save_params(model.init_params(tiny), str(tmp_path / 'model-1'), hparams=tiny)
    deeper = hparams_lib.HParams(**{**tiny.to_dict(), 'n_layer': 3})
    with pytest.raises(UserError, match=r"'n_layer': 3}: 12 missing \(model/h2/attn"):
        checkpoint.load_params(str(tmp_path), hparams=deeper)
    wider = hparams_lib.HParams(**{**tiny.to_dict(), 'n_vocab': 100})
    with pytest.raises(UserError, match=r'model/wte is \[97, 32\], expected \[100, 32\]'):
        checkpoint.load_params(str(tmp_path), hparams=wider)


def test_optimizer_slots_from_tf1_training_are_ignored(tmp_path, tiny):
    p = model.init_params(tiny)
    flat = checkpoint.flatten(p)
    flat['model/wte/Adam'] = np.zeros_like(p['wte'])
    names = sorted(flat)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / 'model-1'), tensor_names=names,
                      shape_and_slices=[''] * len(names), tensors=[flat[k] for k in names])
    loaded, _, _ = checkpoint.load_params(str(tmp_path / 'model-1'), hparams=tiny)
    np.testing.assert_array_equal(loaded['wte'], p['wte'])


@pytest.mark.parametrize('make, expect', [
    (lambda d: d, 'holds no checkpoint'),
    (lambda d: d / 'nothing-here', 'no checkpoint at'),
])
def test_folders_without_a_checkpoint(tmp_path, make, expect):
    with pytest.raises(UserError, match=expect):
        checkpoint.load_params(str(make(tmp_path)))


def test_missing_hparams_and_damaged_data(tmp_path, tiny):
    prefix = checkpoint.save_params(model.init_params(tiny), str(tmp_path / 'model-1'))
    with pytest.raises(UserError, match='no hparams.json beside'):
        checkpoint.load_params(prefix)
    data = prefix + checkpoint.DATA_SUFFIX
    raw = bytearray(open(data, 'rb').read())
    raw[len(raw) // 2] ^= 0xFF
    open(data, 'wb').write(bytes(raw))
    with pytest.raises(UserError, match='damaged|cannot read'):
        checkpoint.load_params(prefix, hparams=tiny)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    run = tmp_path / 'run'
    old = model.init_params(tiny, seed=1)
    checkpoint.save_params(old, str(run / 'model-1'), hparams=tiny)
    before = {f: (run / f).read_bytes() for f in os.listdir(run)}
    real_replace = os.replace

    def crash_after_data(src, dst):
        if dst.endswith('.index'):
            raise OSError(28, 'No space left on device')
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', crash_after_data)
    with pytest.raises(OSError):
        checkpoint.save_params(model.init_params(tiny, seed=2), str(run / 'model-2'), hparams=tiny)
    monkeypatch.undo()
    # Nothing hidden left behind, the state file untouched, and the old checkpoint still loads.
    assert not [f for f in os.listdir(run) if f.startswith('.tmp-')]
    assert (run / 'checkpoint').read_bytes() == before['checkpoint']
    loaded, _, prefix = checkpoint.load_params(str(run))
    assert prefix == str(run / 'model-1')
    np.testing.assert_array_equal(loaded['wte'], old['wte'])
