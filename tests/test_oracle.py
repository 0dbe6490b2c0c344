"""OpenAI's own 117M graph (model.ckpt.meta, committed under tests/data) as the oracle for our
forward pass and checkpoints, with every parameter random: biases, layer-norm gains and shifts
too, so that a dropped bias or a norm stuck at g=1, b=0 cannot agree by accident.

tf.compat.v1 appears here only: it is how OpenAI's TF1 graph is imported and run.

What it catches (each checked once by breaking gpt2/model.py; relative difference of the logits,
against REL_TOL 2e-5): the conv1d bias dropped from `linear` (1.2), layer norm with g=1, b=0
(0.34), the erf GELU in place of OpenAI's tanh form (2.6e-4), layer-norm epsilon 1e-6 instead of
1e-5 (5.2e-3), heads split with the axes swapped (1.3). Ours agrees to 1.0e-6 (printed).
"""
import os

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import model
from tests.conftest import OPENAI_117M
from tests.helpers import random_params

pytestmark = pytest.mark.slow
# max |ours - OpenAI| / max |OpenAI| over all 1024 x 50257 logits: fp32 on both sides gives ~1e-6.
REL_TOL = 2e-5


def run_openai_graph(tokens, *, restore=None, save=None, seed=0):
    """Logits of OpenAI's graph for tokens [1, 1024]: weights restored from `restore`, or its own
    initialisers with every 1-D variable (biases, gains, shifts) then set to random values, saved
    with its own Saver to `save`."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        saver = tf.compat.v1.train.import_meta_graph(os.path.join(OPENAI_117M, 'model.ckpt.meta'))
        if restore:
            saver.restore(sess, restore)
        else:
            sess.run(tf.compat.v1.global_variables_initializer())
            rng = np.random.default_rng(seed)
            vectors = [v for v in tf.compat.v1.global_variables() if v.shape.rank == 1]
            assert len(vectors) == 2 + 12 * 8  # ln_f/{g,b}; per block 2 norms x 2, 4 biases
            for v in vectors:
                start = sess.run(v)
                v.load(start + rng.normal(0, 0.1, start.shape).astype(np.float32), sess)
            saver.save(sess, save, write_meta_graph=False)
        return sess.run('model/MatMul_2:0', {'Placeholder:0': tokens})


def relative_difference(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope='module')
def setup():
    hp = hparams_lib.load(OPENAI_117M)
    tokens = np.random.default_rng(0).integers(0, hp.n_vocab, [1, hp.n_ctx]).astype(np.int32)
    return hp, tokens


def test_our_weights_in_openais_graph(setup, tmp_path):
    hp, tokens = setup
    params = random_params(hp, seed=0)
    assert all(np.abs(v).min() > 0 for k, v in checkpoint.flatten(params).items()
               if k.endswith('/b'))  # no bias left at 0
    prefix = checkpoint.save_params(params, str(tmp_path / 'model-1'), hparams=hp)
    ref = run_openai_graph(tokens, restore=prefix)
    ours, _ = model.forward(hp, model.to_tensors(params), tokens)
    diff = relative_difference(ours.numpy()[0], ref)
    print(f'\nour checkpoint in OpenAI\'s graph: max |logits diff| / max |logits| over 1024x50257 '
          f'= {diff:.2e}')
    assert ref.shape == (hp.n_ctx, hp.n_vocab)
    assert diff <= REL_TOL


def test_openais_weights_in_our_loader(setup, tmp_path):
    hp, tokens = setup
    ref = run_openai_graph(tokens, save=str(tmp_path / 'model.ckpt'))
    (tmp_path / 'hparams.json').write_text(open(os.path.join(OPENAI_117M, 'hparams.json')).read())
    params, loaded_hp, _ = checkpoint.load_params(str(tmp_path))
    assert loaded_hp == hp
    assert abs(params['h'][5]['mlp']['c_fc']['b']).min() > 0 and params['ln_f']['g'].std() > 0.05
    ours, _ = model.forward(hp, model.to_tensors(params), tokens)
    diff = relative_difference(ours.numpy()[0], ref)
    print(f'\nOpenAI\'s checkpoint in our loader: max |logits diff| / max |logits| = {diff:.2e}')
    assert diff <= REL_TOL
