"""gpt2/settings.py: TrainSettings refuses a bad number before train() writes anything, and the
options --layerwise cannot go with."""
import re

import pytest

from gpt2.errors import UserError
from gpt2.settings import TrainSettings
from tests import helpers


@pytest.fixture
def data(tmp_path):
    return helpers.npz(tmp_path / 'data.npz', helpers.pattern())


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
    ('steps', 'ten', "a whole number >= 0, got 'ten'"),
    ('seed', -1, 'a whole number >= 0, got -1'),
])
def test_bad_float_flags_are_refused_before_anything_is_written(tmp_path, tiny, data, flag, value,
                                                                want):
    """Catches: a flag checked by comparison alone (NaN passes `x < 0`), or not at all (a rate
    of -1 trained uphill; a string raised TypeError's traceback)."""
    with pytest.raises(UserError, match=f'^--{flag} must be ' + re.escape(want)):
        helpers.train_tiny(tmp_path, tiny, data, jit_compile=False, **{'steps': 2, flag: value})
    assert not (tmp_path / 'ckpt').exists()


def test_settings_refuse_what_layerwise_cannot_do():
    with pytest.raises(UserError, match='cannot clip by the global norm: drop --max_grad_norm'):
        TrainSettings(dataset='x', layerwise=True, max_grad_norm=1.0)
    with pytest.raises(UserError, match='use --precision bf16 with it'):
        TrainSettings(dataset='x', layerwise=True, precision='fp16')
