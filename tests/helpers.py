"""What several test files share: a learnable token stream and its .npz, train(dataset, **flags)
and a quick tiny run, a tree's leaves as arrays, a random tree and its loss in NumPy, and the
TensorBoard scalars a run wrote."""
import os

import numpy as np
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import model
from gpt2 import settings
from gpt2 import training


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
