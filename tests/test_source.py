"""gpt2/source.py: the checkpoint and the run folder sample.py's flags name, and the encoder."""
import os

import pytest

from gpt2 import checkpoint, model, source
from gpt2.errors import UserError
from gpt2.settings import SampleSettings


def test_the_flags_name_one_path():
    assert source.path(SampleSettings()) == os.path.join('models', '124M')
    assert source.path(SampleSettings(model_name='117M', models_dir='m')) == os.path.join('m',
                                                                                         '124M')
    assert source.path(SampleSettings(run_name='r', checkpoint_dir='c')) == os.path.join('c', 'r')
    assert source.path(SampleSettings(checkpoint='c/r/model-5')) == 'c/r/model-5'
    with pytest.raises(UserError, match='^give one of --model_name, --run_name or --checkpoint, '
                                        'not several$'):
        SampleSettings(model_name='124M', checkpoint='c/r/model-5')


def test_the_run_folder_is_there_or_named_in_the_error(tmp_path):
    assert source.run_folder(SampleSettings()) is None
    (tmp_path / 'r').mkdir()
    assert source.run_folder(SampleSettings(run_name='r', checkpoint_dir=str(tmp_path))) == str(
        tmp_path / 'r')
    with pytest.raises(UserError, match=r'no run folder .*nope \(from --run_name nope under '
                                        r'--checkpoint_dir '):
        source.run_folder(SampleSettings(run_name='nope', checkpoint_dir=str(tmp_path)))


def test_load_gives_the_latest_checkpoint_of_a_run_and_an_encoder(tiny, tmp_path):
    for step in (3, 7):
        checkpoint.save_params(model.init_params(tiny, seed=step),
                               str(tmp_path / 'r' / f'model-{step}'), hparams=tiny)
    params, hparams, prefix, enc = source.load(SampleSettings(run_name='r',
                                                              checkpoint_dir=str(tmp_path)))
    assert prefix == str(tmp_path / 'r' / 'model-7') and hparams == tiny
    assert (params['wte'] == model.init_params(tiny, seed=7)['wte']).all()
    assert enc.decode(enc.encode('The night was')) == 'The night was'
