"""OpenAI's own 117M graph (model.ckpt.meta) as the oracle for our forward pass and checkpoints.

tf.compat.v1 appears here only: it is how OpenAI's TF1 graph is imported and run.
"""
import os

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import model
from tests.conftest import OPENAI_117M, require_shared

pytestmark = pytest.mark.slow
TOL = 1e-4


def run_openai_graph(tokens, *, restore=None, save=None):
    """Logits of OpenAI's graph for tokens [1, 1024]: weights restored from `restore`, or its own
    initialisers (then saved with its own Saver to `save`)."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        saver = tf.compat.v1.train.import_meta_graph(os.path.join(OPENAI_117M, 'model.ckpt.meta'))
        if restore:
            saver.restore(sess, restore)
        else:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, save, write_meta_graph=False)
        return sess.run('model/MatMul_2:0', {'Placeholder:0': tokens})


@pytest.fixture(scope='module')
def setup():
    require_shared()
    hp = hparams_lib.load(OPENAI_117M)
    tokens = np.random.default_rng(0).integers(0, hp.n_vocab, [1, hp.n_ctx]).astype(np.int32)
    return hp, tokens


def test_our_weights_in_openais_graph(setup, tmp_path):
    hp, tokens = setup
    params = model.init_params(hp, seed=0)
    prefix = checkpoint.save_params(params, str(tmp_path / 'model-1'), hparams=hp)
    ref = run_openai_graph(tokens, restore=prefix)
    ours, _ = model.forward(hp, model.to_tensors(params), tokens)
    diff = float(np.abs(ours.numpy()[0] - ref).max())
    print(f'\nour checkpoint in OpenAI\'s graph: max |logits diff| over 1024x50257 = {diff:.2e}')
    assert ref.shape == (hp.n_ctx, hp.n_vocab)
    assert diff <= TOL


def test_openais_weights_in_our_loader(setup, tmp_path):
    hp, tokens = setup
    ref = run_openai_graph(tokens, save=str(tmp_path / 'model.ckpt'))
    (tmp_path / 'hparams.json').write_text(open(os.path.join(OPENAI_117M, 'hparams.json')).read())
    params, loaded_hp, _ = checkpoint.load_params(str(tmp_path))
    assert loaded_hp == hp
    ours, _ = model.forward(hp, model.to_tensors(params), tokens)
    diff = float(np.abs(ours.numpy()[0] - ref).max())
    print(f'\nOpenAI\'s checkpoint in our loader: max |logits diff| = {diff:.2e}')
    assert diff <= TOL
