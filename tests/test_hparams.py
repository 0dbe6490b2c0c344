"""gpt2/hparams.py: OpenAI's hparams.json read and checked, with errors that say what to fix."""
import json

import pytest

from gpt2 import hparams as hparams_lib
from gpt2.errors import UserError
from tests.conftest import OPENAI_117M, require_shared


def test_openai_117m_file():
    require_shared()
    hp = hparams_lib.load(OPENAI_117M)
    assert hp == hparams_lib.PRESETS['124M'] and hp.head_dim == 64


def test_round_trip_and_presets(tmp_path):
    hp = hparams_lib.PRESETS['tiny']
    hparams_lib.save(hp, str(tmp_path))
    assert hparams_lib.load(str(tmp_path / 'hparams.json')) == hp
    assert hparams_lib.get('tiny') == hp and hparams_lib.get(str(tmp_path)) == hp
    for p in hparams_lib.PRESETS.values():
        assert p.n_embd % p.n_head == 0


@pytest.mark.parametrize('content, expect', [
    ('{"n_vocab": 5}', 'missing n_ctx, n_embd, n_head, n_layer'),
    ('{"n_vocab": 5, "n_ctx": 8, "n_embd": 8, "n_head": 3, "n_layer": 1}', 'divisible by n_head'),
    ('{"n_vocab": 5, "n_ctx": "8", "n_embd": 8, "n_head": 2, "n_layer": 0}',
     "n_ctx must be a positive integer, got '8'; n_layer must be a positive integer, got 0"),
    ('{"n_vocab": 5, "n_ctx": 8, "n_embed": 8, "n_head": 2, "n_layer": 1}', 'unknown n_embed'),
    ('{"n_vocab": 5,', 'not valid JSON'),
    ('[1, 2]', 'expected a JSON object'),
])
def test_malformed_files(tmp_path, content, expect):
    path = tmp_path / 'hparams.json'
    path.write_text(content)
    with pytest.raises(UserError, match=expect.replace('(', r'\(')):
        hparams_lib.load(str(path))


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(UserError, match='no hparams file at'):
        hparams_lib.load(str(tmp_path))
    with pytest.raises(UserError, match='unknown hparams .nope.: give a preset'):
        hparams_lib.get('nope')
    json.dumps(hparams_lib.PRESETS['124M'].to_dict())
