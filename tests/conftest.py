"""Shared test setup: quiet TensorFlow, tiny hparams, and the path of ../shared."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported by any test

import pytest  # noqa: E402

from gpt2 import hparams as hparams_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get('GPT2_SHARED', os.path.join(os.path.dirname(ROOT), 'shared'))
OPENAI_117M = os.path.join(SHARED, 'gpt2-117M')
CORPORA = os.path.join(SHARED, 'corpora')


@pytest.fixture
def tiny():
    """A 2-layer model small enough for many forward passes per test."""
    return hparams_lib.HParams(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=2)


def require_shared():
    if not os.path.isdir(OPENAI_117M):
        pytest.skip(f'OpenAI release files not found at {OPENAI_117M} (set GPT2_SHARED)')


def run_sample_py(argv, capsys, monkeypatch):
    """Run sample.py's entry in-process with `argv`; returns (exit code, stdout, stderr)."""
    import sample
    monkeypatch.setattr('sys.argv', ['sample.py'] + list(argv))
    code = 0
    try:
        sample.entry()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
