"""The suite's own rules: under CI=true a skipped test fails the run (a missing fixture or oracle
dependency must not pass quietly) and no marker expression leaves tests out (scripts/test.sh's
plain -m 'not slow'), the committed oracle files are whole, and test files share helpers through
tests/helpers.py."""
import glob
import os
import re
import shutil
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


def _test_sh(tmp_path, *args, ci=''):
    """scripts/test.sh as it is, run in a copy of its folder whose venv.sh does nothing and whose
    .venv/bin/python prints its arguments -> (the arguments pytest would get, stderr)."""
    (tmp_path / 'scripts').mkdir(exist_ok=True)
    shutil.copy(os.path.join(ROOT, 'scripts', 'test.sh'), tmp_path / 'scripts' / 'test.sh')
    (tmp_path / 'scripts' / 'venv.sh').write_text('')
    python = tmp_path / '.venv' / 'bin' / 'python'
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    python.chmod(0o755)
    out = subprocess.run(['bash', str(tmp_path / 'scripts' / 'test.sh'), *args],
                         capture_output=True, text=True, env=dict(os.environ, CI=ci), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), out.stderr


def test_test_sh_leaves_out_the_slow_tests_unless_ci_or_asked(tmp_path):
    args, err = _test_sh(tmp_path, '-q', '-k', 'encoder')
    assert args == ['-m', 'pytest', '-m', 'not slow', '-q', '-k', 'encoder']
    assert 'leaving out the tests marked slow' in err
    for given, ci, want in [(['-q'], 'true', ['-q']), (['-q'], 'TRUE', ['-q']),
                            (['--all', '-q'], '', ['-q']),
                            (['-m', 'slow'], '', ['-m', 'slow']),
                            (['tests/test_demo.py'], '', ['tests/test_demo.py'])]:
        args, err = _test_sh(tmp_path, *given, ci=ci)
        assert args == ['-m', 'pytest', *want] and not err, (given, ci, args, err)


def test_the_committed_oracle_files_are_there():
    # What a clone with no ../shared runs the graph oracle and the real-text tests from.
    sizes = {name: os.path.getsize(os.path.join(OPENAI_117M, name))
             for name in ('model.ckpt.meta', 'model.ckpt.index', 'hparams.json')}
    assert sizes['model.ckpt.meta'] == 471155 and sizes['model.ckpt.index'] == 5215
    assert sum(os.path.getsize(os.path.join(CORPORA, f)) for f in os.listdir(CORPORA)) > 100000


def test_test_files_share_helpers_through_helpers_py_not_each_other():
    """What several test files use lives in tests/helpers.py or tests/conftest.py: a test file
    that imports another collects (and may run) the other's module-level setup too."""
    crossed = []
    for path in sorted(glob.glob(os.path.join(ROOT, 'tests', 'test_*.py'))):
        with open(path, encoding='utf-8') as f:
            crossed += [f'{os.path.basename(path)}: {line.strip()}' for line in f
                        if re.match(r'\s*(from tests\.test_|import tests\.test_|from \.test_)',
                                    line)]
    assert not crossed, crossed
