"""What train.py and the checkpoint files promise a new user: bad float flags are refused, a damaged
checkpoint is one line, saves are durable, and only the newest checkpoint keeps the optimizer's
slots (gpt2/training.py, gpt2/checkpoint.py, gpt2/paths.py)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpt2 import checkpoint
from gpt2 import model
from gpt2 import paths
from gpt2 import training
from gpt2.errors import UserError
from tests.conftest import ROOT

PY = sys.executable


def _npz(path, n=3000, vocab=97):
    # A learnable stream: a repeating phrase of 17 tokens with a few random substitutions.
    rng = np.random.default_rng(0)
    t = np.tile(np.arange(17) * 5 % vocab, n // 17 + 1)[:n]
    flip = rng.random(n) < 0.05
    t[flip] = rng.integers(0, vocab, flip.sum())
    np.savez(path, t.astype(np.int32))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return _npz(tmp_path / 'data.npz')


def _train(tmp_path, tiny, dataset, **kw):
    opts = dict(from_scratch=True, hparams=tiny, checkpoint_dir=str(tmp_path / 'ckpt'),
                sample_every=0, save_every=0, seq_len=16, batch_size=2, learning_rate=3e-3,
                jit_compile=False, progress=False)  # (XLA's compile would be most of the time)
    opts.update(kw)
    return training.train(dataset, **opts)


def _run(*argv, cwd):
    """A script in a subprocess (120 s is a hang guard): (exit code, stderr lines)."""
    out = subprocess.run([PY, *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    return out.returncode, out.stderr.strip().splitlines(), out.stderr


def _hparams_file(tmp_path, tiny):
    path = tmp_path / 'hp.json'
    path.write_text(json.dumps(tiny.to_dict()))
    return str(path)


def _sidecar(prefix):
    meta, slots = training.load_training_state(prefix)
    return meta, {k for k in slots if k.startswith('slot/')}


# ---------------------------------------------------------------- float flags

@pytest.mark.parametrize('flag, value, want', [
    ('learning_rate', -1, 'a finite number > 0, got -1'),
    ('learning_rate', 0, 'a finite number > 0, got 0'),
    ('learning_rate', float('nan'), 'a finite number > 0, got nan'),
    ('learning_rate', float('inf'), 'a finite number > 0, got inf'),
    ('learning_rate', 'fast', "a finite number > 0, got 'fast'"),
    ('weight_decay', -0.01, 'a finite number >= 0, got -0.01'),
    ('weight_decay', float('nan'), 'a finite number >= 0, got nan'),
    ('max_grad_norm', 0, 'a finite number > 0 (leave it out for no clipping), got 0'),
    ('max_grad_norm', -1.0, 'a finite number > 0'),
    ('max_grad_norm', float('nan'), 'a finite number > 0'),
    ('noise', float('nan'), 'a probability in [0, 1), got nan'),
    ('noise', 'some', "a probability in [0, 1), got 'some'"),
    ('steps', 'ten', "an integer >= 0, got 'ten'"),
    ('seed', -1, 'an integer >= 0, got -1'),
])
def test_bad_float_flags_are_refused_before_anything_is_written(tmp_path, tiny, data, flag,
                                                                 value, want):
    """Catches: a flag checked by comparison alone (NaN passes `x < 0`), or not at all (a rate
    of -1 trained uphill; a string raised TypeError's traceback)."""
    with pytest.raises(UserError, match=f'^--{flag} must be ' + re.escape(want)):
        _train(tmp_path, tiny, data, **{'steps': 2, flag: value})
    assert not (tmp_path / 'ckpt').exists()


def test_train_py_refuses_a_negative_learning_rate_in_one_line(tmp_path, tiny, data):
    """Catches: train.py training with --learning_rate -1 (the loss climbs), or a traceback."""
    code, lines, err = _run(os.path.join(ROOT, 'train.py'), '--dataset', data, '--from_scratch',
                            '--hparams', _hparams_file(tmp_path, tiny), '--checkpoint_dir',
                            str(tmp_path / 'ckpt'), '--seq_len', '16', '--sample_every', '0',
                            '--steps', '3', '--learning_rate', '-1', cwd=tmp_path)
    assert code == 1, err
    assert lines == ['train.py: error: --learning_rate must be a finite number > 0, got -1'], err
    assert not (tmp_path / 'ckpt').exists()
