"""The suite's own rules: under CI=true a skipped test fails the run (a missing fixture or oracle
dependency must not pass quietly) and no marker expression leaves tests out (scripts/test.sh's
plain -m 'not slow'), and the committed oracle files are whole."""
import os
import subprocess
import sys

from tests.conftest import CORPORA, OPENAI_117M, ROOT


def _pytest_with_our_conftest(tmp_path, ci, *args):
    (tmp_path / 'test_x.py').write_text(
        'import pytest\n\n'
        'def test_needs_a_missing_oracle():\n'
        '    pytest.importorskip("no_such_oracle_module")\n\n'
        'def test_fine():\n'
        '    pass\n')
    env = dict(os.environ, CI='true' if ci else '', PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-m', 'pytest', '-p', 'tests.conftest', '-q',
                           '-p', 'no:cacheprovider', *args, str(tmp_path / 'test_x.py')],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_a_skip_fails_under_ci(tmp_path):
    out = _pytest_with_our_conftest(tmp_path, ci=True)
    assert out.returncode == 1, out.stdout
    assert '1 failed, 1 passed' in out.stdout
    assert 'skipped under CI=true' in out.stdout and 'no_such_oracle_module' in out.stdout


def test_a_skip_is_a_skip_elsewhere(tmp_path):
    out = _pytest_with_our_conftest(tmp_path, ci=False)
    assert out.returncode == 0, out.stdout
    assert '1 passed, 1 skipped' in out.stdout


def test_ci_refuses_a_marker_expression(tmp_path):
    out = _pytest_with_our_conftest(tmp_path, True, '-m', 'not slow')
    assert out.returncode == 4 and 'passed' not in out.stdout, out.stdout
    assert "CI=true runs every test, so no -m (given: -m 'not slow')" in out.stderr
    out = _pytest_with_our_conftest(tmp_path, False, '-m', 'not slow')
    assert out.returncode == 0 and '1 passed, 1 skipped' in out.stdout, out.stdout


def test_the_committed_oracle_files_are_there():
    # What a clone with no ../shared runs the graph oracle and the real-text tests from.
    sizes = {name: os.path.getsize(os.path.join(OPENAI_117M, name))
             for name in ('model.ckpt.meta', 'model.ckpt.index', 'hparams.json')}
    assert sizes['model.ckpt.meta'] == 471155 and sizes['model.ckpt.index'] == 5215
    assert sum(os.path.getsize(os.path.join(CORPORA, f)) for f in os.listdir(CORPORA)) > 100000
