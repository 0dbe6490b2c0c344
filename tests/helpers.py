"""What several test files share: a learnable token stream and its .npz, train(dataset, **flags)
and a quick tiny run, a tree's leaves as arrays, random trees (and one's loss in NumPy), the
TensorBoard scalars a run wrote, token rows, and a toy model with GPT-2's vocabulary that
sample.py runs on."""
import os
import re

import numpy as np
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2 import settings
from gpt2 import training
from gpt2.samples_file import SAMPLE_DELIMITER
from tests.conftest import run_sample_py


def npz(path, tokens):
    """`tokens` saved as an int32 .npz at `path`; returns the path as a string."""
    np.savez(path, np.asarray(tokens, np.int32))
    return str(path)


def pattern(n=3000, vocab=97, seed=0, lo=0):
    """A learnable stream: a repeating phrase of 17 tokens with a few random substitutions."""
    rng = np.random.default_rng(seed)
    t = np.tile(np.arange(17) * 5 % vocab, n // 17 + 1)[:n] + lo
    flip = rng.random(n) < 0.05
    t[flip] = rng.integers(0, vocab, flip.sum())
    return t % vocab


def train(dataset=None, **flags):
    """training.run with the settings that train.py's `flags` (by name) make."""
    return training.run(settings.TrainSettings.from_flags(dataset=dataset, **flags))


def train_tiny(tmp_path, tiny, dataset, **kw):
    """train() of `tiny` from scratch into tmp_path/ckpt: windows of 16, batches of 2, no samples
    and no saves but the last, no progress bar; `kw` adds or overrides flags."""
    opts = dict(from_scratch=True, hparams=tiny, checkpoint_dir=str(tmp_path / 'ckpt'),
                sample_every=0, save_every=0, seq_len=16, batch_size=2, learning_rate=3e-3,
                progress=False)
    opts.update(kw)
    return train(dataset, **opts)


def leaves(tree):
    """{checkpoint name: NumPy array} of a tree of arrays, tensors or variables."""
    return {k: np.asarray(v) for k, v in checkpoint.flatten(tree).items()}


def random_tree(hp, seed):
    """A tree with every leaf random (biases and gains too), so no gradient is trivially zero or
    one."""
    rng = np.random.default_rng(seed)
    flat = {k: (rng.standard_normal(v.shape) * 0.1 + (1 if k.endswith('/g') else 0))
            .astype(np.float32) for k, v in checkpoint.flatten(model.init_params(hp)).items()}
    return checkpoint.unflatten(flat, hp)


def mean_loss(hp, tree, windows):
    """The mean next-token cross-entropy of windows [batch, seq+1] under `tree`, in NumPy from
    model.forward's logits (not through model.loss, the code under test)."""
    logits, _ = model.forward(hp, model.to_tensors(tree), tf.constant(windows[:, :-1]))
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, windows[:, 1:, None].astype(np.int64), -1)[..., 0]
    return float(np.mean(lse - picked))


def scalars(run):
    """{tag: {step: value}}: the TensorBoard scalars in a run folder, read from its event files."""
    out = {}
    for f in sorted(os.listdir(run)):
        if f.startswith('events.out'):
            for e in tf.compat.v1.train.summary_iterator(os.path.join(run, f)):
                for v in e.summary.value:
                    out.setdefault(v.tag, {})[e.step] = float(tf.make_ndarray(v.tensor))
    return out


# ---- model trees and tokens for the forward, sampling and oracle tests

def random_params(hp, seed):
    """init_params with random (not 1/0) norms and biases, so every parameter matters."""
    p = model.init_params(hp, seed=seed)
    rng = np.random.default_rng(seed + 100)
    return tf.nest.map_structure(
        lambda a: a + rng.normal(0, 0.1, a.shape).astype(a.dtype) if a.ndim == 1 else a, p)


def lively_params(hp, seed):
    """A tree whose every parameter moves the logits: random biases, gains and shifts, and
    matrices large enough (std 1.2/sqrt(nx)) that the GELU sees inputs across its curve (about
    -4..4, where tanh and erf forms differ), while the embeddings stay OpenAI-small (std 0.02), so
    the first layer norm's variance is near its epsilon and a wrong epsilon shows."""
    rng = np.random.default_rng(seed)

    def leaf(name, a):
        if a.ndim == 1:
            return rng.normal(1 if name.endswith('/g') else 0, 0.3, a.shape).astype(np.float32)
        if name in ('model/wte', 'model/wpe'):
            return rng.normal(0, 0.02, a.shape).astype(np.float32)
        return rng.normal(0, 1.2 / np.sqrt(a.shape[-2]), a.shape).astype(np.float32)
    flat = checkpoint.flatten(model.init_params(hp, seed=seed))
    return checkpoint.unflatten({k: leaf(k, a) for k, a in flat.items()}, hp)


def tokens_for(hp, batch, seq, seed=0):
    """[batch, seq] random token ids (int32)."""
    return np.random.default_rng(seed).integers(0, hp.n_vocab, [batch, seq]).astype(np.int32)


def sharp(hp, seed, scale=4.0):
    """Random weights scaled up so that the next token depends strongly on the context."""
    tree = model.init_params(hp, seed=seed)
    return tf.nest.map_structure(lambda x: x * scale if x.ndim > 1 else x, tree)


# ---- a toy model with GPT-2's vocabulary, and sample.py run on it

# GPT-2's vocabulary (so sample.py's encoder applies) in a model small enough for many runs.
VOCAB_HP = hparams_lib.HParams(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)


def save_toy(folder):
    """folder/toy: sharp random weights with GPT-2's vocabulary, saved like a downloaded model."""
    checkpoint.save_params(sharp(VOCAB_HP, seed=0), str(folder / 'toy' / 'model.ckpt'),
                           hparams=VOCAB_HP)
    return folder


def samples_of(out):
    """The samples sample.py printed between its delimiter lines (print adds one newline)."""
    d = re.escape(SAMPLE_DELIMITER)
    parts = re.split(rf'^{d} SAMPLE \d+ {d}\n', out, flags=re.M)
    assert parts[0] == '' and all(p.endswith('\n') for p in parts[1:]), out
    return [p[:-1] for p in parts[1:]]


def sampled(models, name, argv, capsys, monkeypatch):
    """(stdout, stderr) of sample.py, exiting 0, with models/NAME and `argv`."""
    code, out, err = run_sample_py(['--models_dir', str(models), '--model_name', name,
                                    '--xla', 'False', *argv], capsys, monkeypatch)
    assert code == 0, err
    return out, err
