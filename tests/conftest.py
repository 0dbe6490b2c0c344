"""Shared test setup: quiet TensorFlow, tiny hparams, the committed OpenAI release files and texts,
and, under CI, no skips."""
import glob
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported by any test

import pytest  # noqa: E402

from gpt2 import hparams as hparams_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
# OpenAI's 117M release files without the weights, committed (tests/data/README.md says whence).
OPENAI_117M = os.path.join(DATA, 'gpt2-117M')
# Public-domain texts committed for the real-text tests; ../shared/corpora adds larger ones.
CORPORA = os.path.join(DATA, 'corpora')
SHARED = os.environ.get('GPT2_SHARED', os.path.join(os.path.dirname(ROOT), 'shared'))
SHARED_CORPORA = os.path.join(SHARED, 'corpora')
IN_CI = os.environ.get('CI', '').lower() == 'true'


def corpus_files():
    """The committed texts, then those of ../shared/corpora when it is there."""
    return (sorted(glob.glob(os.path.join(CORPORA, '*.txt'))) +
            sorted(glob.glob(os.path.join(SHARED_CORPORA, '*.txt'))))


def real_text(chars):
    """Up to `chars` characters of real prose, from the committed texts (about 120 000 in all)."""
    text = ''
    for path in sorted(glob.glob(os.path.join(CORPORA, '*.txt'))):
        with open(path, encoding='utf-8') as f:
            text += f.read()
    assert len(text) > 100000, f'the committed texts in {CORPORA} are missing'
    return text[:chars]


@pytest.fixture
def tiny():
    """A 2-layer model small enough for many forward passes per test."""
    return hparams_lib.HParams(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=2)


def require_shared():
    """The OpenAI release files are committed under tests/data; a clone without them is broken,
    so this fails rather than skips."""
    assert os.path.isfile(os.path.join(OPENAI_117M, 'model.ckpt.meta')), \
        f'OpenAI release files missing from {OPENAI_117M}'


def pytest_configure(config):
    # CI runs every test: a marker expression there (such as scripts/test.sh's plain
    # -m 'not slow') would leave the heavier proofs out without a word.
    if IN_CI and config.getoption('markexpr', ''):
        raise pytest.UsageError(f"CI=true runs every test, so no -m "
                                f"(given: -m '{config.getoption('markexpr')}')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Under CI a skip hides a missing fixture or oracle dependency (tiktoken, transformers):
    # there it is a failure, with the skip's reason.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, 'wasxfail'):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = 'failed'
        report.longrepr = f'skipped under CI=true, which allows no skips: {reason}'


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
