"""gpt2/prompts.py as sample.py's flags reach it: --stop lists, --prompt_file blocks or lines.
Each expected text is what sample.py writes for the same seed without the feature (cut by
str.find), or for each prompt given alone."""
import numpy as np
import pytest

from gpt2 import checkpoint, model
from tests.helpers import VOCAB_HP, sampled, samples_of, save_toy

NN, END = 628, 10619          # GPT-2's ids of '\n\n' and 'END'


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """models/toy (helpers.save_toy). models/prone: a model that ignores its context
    and writes '\\n\\n' and 'END' each with probability ~0.08 per token (ln_f's gain is 0, so every
    position's logits are ln_f's bias times wte)."""
    d = save_toy(tmp_path_factory.mktemp('models'))
    tree = model.init_params(VOCAB_HP, seed=1)
    e = np.zeros(VOCAB_HP.n_embd, np.float32)
    e[0] = 1.0
    tree['ln_f'] = {'g': np.zeros_like(e), 'b': 0.847 * e}
    tree['wte'][[NN, END]] += 10.0 * e
    checkpoint.save_params(tree, str(d / 'prone' / 'model.ckpt'), hparams=VOCAB_HP)
    return d


def test_cli_stop_json_list_stops_at_whichever_comes_first(models, capsys, monkeypatch):
    """--stop '["\\n\\n", "END"]' (as typed in a shell): each sample ends where it first writes
    either, without it; --stop '\\n\\n' alone at the first '\\n\\n'. Expected texts are the same
    seeded samples run without --stop, cut by str.find.

    Caught (gpt2.prompts.stops): the list taken as one string (never found: nothing stops);
    only its first entry used."""
    argv = ['--length', '30', '--seed', '5', '--nsamples', '8', '--batch_size', '8']
    free = samples_of(sampled(models, 'prone', argv, capsys, monkeypatch)[0])
    both = samples_of(sampled(models, 'prone', argv + ['--stop', '["\\n\\n", "END"]'], capsys,
                              monkeypatch)[0])
    one = samples_of(sampled(models, 'prone', argv + ['--stop', '\\n\\n'], capsys,
                             monkeypatch)[0])
    assert len(free) == len(both) == len(one) == 8

    def cut(text, stops):
        hits = [text.find(s) for s in stops if s in text]
        return text[:min(hits)] if hits else text
    for t, b, o in zip(free, both, one):
        assert b == cut(t, ['\n\n', 'END']), (t, b)
        assert o == cut(t, ['\n\n']), (t, o)
    first = [min((t.find(s), s) for s in ('\n\n', 'END') if s in t)[1] for t in free
             if '\n\n' in t or 'END' in t]
    # Both entries do the stopping somewhere, so neither alone explains the texts.
    assert first.count('\n\n') >= 2 and first.count('END') >= 2, first


def test_cli_prompt_file_blocks_or_lines(models, tmp_path, capsys, monkeypatch):
    """--prompt_file: one prompt per blank-line separated block when the file has a blank line
    (a line of spaces counts), else one per line; each sample is what --prompt gives for its
    prompt alone (greedy, --include_prompt).

    Caught (gpt2.prompts.read): always one prompt per line; always blocks (a file
    without blank lines would be one prompt); a line of spaces not taken as blank (the bug
    this test found)."""
    argv = ['--length', '4', '--temperature', '0', '--include_prompt']
    files = {
        'blocks.txt': ('The night was\ndark and cold\n\nOnce upon a time\n\n\nIn the beginning\n',
                       ['The night was\ndark and cold', 'Once upon a time', 'In the beginning']),
        'lines.txt': ('The night was\ndark and cold\nOnce upon a time\n',
                      ['The night was', 'dark and cold', 'Once upon a time']),
        'spaces.txt': ('The night was\ndark and cold\n  \nOnce upon a time\n',
                       ['The night was\ndark and cold', 'Once upon a time']),
    }
    alone = {}
    for name, (text, prompts) in files.items():
        (tmp_path / name).write_text(text, encoding='utf-8')
        got = samples_of(sampled(models, 'toy', ['--prompt_file', str(tmp_path / name), *argv],
                                 capsys, monkeypatch)[0])
        for p in prompts:
            if p not in alone:
                alone[p] = samples_of(sampled(models, 'toy', ['--prompt', p.replace('\n', '\\n'),
                                                              *argv], capsys, monkeypatch)[0])
        assert got == [s for p in prompts for s in alone[p]], name
        assert all(s.startswith(p) for s, p in zip(got, prompts))
