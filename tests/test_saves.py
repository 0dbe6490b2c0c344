"""What train.py and the checkpoint files promise a new user: a bad flag is one line, a damaged
checkpoint is one line, and saves are durable (train.py, gpt2/checkpoint.py, gpt2/paths.py,
gpt2/runs.py's save). TrainSettings' own checks are tests/test_settings.py's; which checkpoints
and optimizer slots are kept, tests/test_runs.py's."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2 import checkpoint
from gpt2 import model
from gpt2 import paths
from gpt2 import runs
from gpt2 import step as step_lib
from gpt2.errors import UserError
from tests import helpers
from tests.conftest import ROOT

PY = sys.executable


@pytest.fixture
def data(tmp_path):
    return helpers.npz(tmp_path / 'data.npz', helpers.pattern())


def _run(*argv, cwd):
    """A script in a subprocess (120 s is a hang guard): (exit code, stderr lines)."""
    out = subprocess.run([PY, *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    return out.returncode, out.stderr.strip().splitlines(), out.stderr


def _hparams_file(tmp_path, tiny):
    path = tmp_path / 'hp.json'
    path.write_text(json.dumps(tiny.to_dict()))
    return str(path)


# ---------------------------------------------------------------- a bad flag

def test_train_py_refuses_a_negative_learning_rate_in_one_line(tmp_path, tiny, data):
    """Catches: train.py training with --learning_rate -1 (the loss climbs), or a traceback."""
    code, lines, err = _run(os.path.join(ROOT, 'train.py'), '--dataset', data, '--from_scratch',
                            '--hparams', _hparams_file(tmp_path, tiny), '--checkpoint_dir',
                            str(tmp_path / 'ckpt'), '--seq_len', '16', '--sample_every', '0',
                            '--steps', '3', '--learning_rate', '-1', cwd=tmp_path)
    assert code == 1, err
    assert lines == ['train.py: error: --learning_rate must be a finite number > 0, got -1'], err
    assert not (tmp_path / 'ckpt').exists()


# ---------------------------------------------------------------- damaged checkpoints

@pytest.fixture
def saved(tmp_path, tiny):
    """A tiny checkpoint in its own folder, with hparams.json and the vocabulary beside it."""
    prefix = checkpoint.save_params(model.init_params(tiny, seed=1),
                                    str(tmp_path / 'good' / 'model-5'), hparams=tiny)
    runs.copy_vocab(runs.ENCODER_DIR, str(tmp_path / 'good'))
    return prefix


def _cut(prefix, keep):
    data = prefix + checkpoint.DATA_SUFFIX
    raw = open(data, 'rb').read()
    with open(data, 'wb') as f:
        f.write(raw[:keep])
    return len(raw)


@pytest.mark.parametrize('keep', [0, 1000, -1])
def test_a_truncated_data_file_is_one_clear_error(saved, tiny, keep):
    """Catches: load_params letting the reader's 30-line `IndexError: Read less bytes than
    requested` through (remove the size check and the IndexError catch)."""
    full = os.path.getsize(saved + checkpoint.DATA_SUFFIX)
    keep = keep % full
    _cut(saved, keep)
    with pytest.raises(UserError) as e:
        checkpoint.load_params(saved)
    assert str(e.value) == (
        f'checkpoint {saved} is damaged: model-5.data-00000-of-00001 is {keep} bytes, the index '
        f'expects {full} (a copy that did not finish?); copy it again or use another checkpoint')


def test_a_missing_data_file_is_one_clear_error(saved):
    """Catches: the reader's NotFound text passed on without saying which file is missing."""
    os.remove(saved + checkpoint.DATA_SUFFIX)
    with pytest.raises(UserError, match=r'damaged: model-5.data-00000-of-00001 is missing'):
        checkpoint.load_params(saved)


def test_a_data_file_of_garbage_fails_the_checksum(saved):
    """Catches: garbage of the right size loading as weights (the CRC check not run), or the
    reader's error escaping as an OpError traceback."""
    data = saved + checkpoint.DATA_SUFFIX
    n = os.path.getsize(data)
    with open(data, 'wb') as f:
        f.write(np.random.default_rng(0).bytes(n))
    with pytest.raises(UserError, match=r'^checkpoint .*model-5 is damaged: '
                                        r'model-5.data-00000-of-00001 fails the checksum of '
                                        r'model/'):
        checkpoint.load_params(saved)


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_scripts_report_a_damaged_checkpoint_in_one_line(tmp_path, tiny, data, saved, damage):
    """Catches: train.py --restore_from and sample.py --checkpoint printing the reader's traceback
    for a half-copied or garbled data file (load_params serves both)."""
    full = _cut(saved, 5000)
    if damage == 'garbage':
        with open(saved + checkpoint.DATA_SUFFIX, 'wb') as f:
            f.write(b'\x5a' * full)
    want = 'is 5000 bytes, the index expects' if damage == 'truncated' else 'fails the checksum'
    code, lines, err = _run(os.path.join(ROOT, 'train.py'), '--dataset', data,
                            '--restore_from', saved, '--checkpoint_dir', str(tmp_path / 'ckpt'),
                            '--seq_len', '16', '--sample_every', '0', '--steps', '8',
                            cwd=tmp_path)
    assert code == 1 and len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'train.py: error: checkpoint {saved} is damaged: '
                               'model-5.data-00000-of-00001 ') and want in lines[0], err
    assert not (tmp_path / 'ckpt').exists()
    code, lines, err = _run(os.path.join(ROOT, 'sample.py'), '--checkpoint', saved, '--length',
                            '3', '--prompt', 'a', cwd=tmp_path)
    assert code == 1 and len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith(f'sample.py: error: checkpoint {saved} is damaged: '
                               'model-5.data-00000-of-00001 ') and want in lines[0], err


# ---------------------------------------------------------------- durable saves

@pytest.fixture
def synced(monkeypatch):
    """Records ('fsync', real path) and ('replace', src, dst) in the order they happen."""
    if not os.path.isdir('/proc/self/fd'):
        pytest.skip('needs /proc/self/fd to name what an fd is')
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(('replace', os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    return events


def _durable_before(events, final, limit):
    """True if `final` took its name by a rename of a file fsynced before that rename, its folder
    was fsynced after the rename, and both happened before event number `limit`."""
    final = os.path.realpath(final)
    for i, e in enumerate(events[:limit]):
        if e[0] == 'replace' and e[2] == final:
            fsynced = ('fsync', e[1]) in events[:i]
            folder = ('fsync', os.path.dirname(final)) in events[i + 1:limit]
            return fsynced and folder
    return False


def test_a_save_is_on_the_disk_before_the_state_file_names_it(tmp_path, tiny, synced):
    """Catches: any of the fsyncs removed (the temporary data and index files before their
    renames, the sidecar, the folder, the state file) or done after the state file's rename: a
    power cut then could leave a state file naming empty files."""
    run = tmp_path / 'run'
    state = step_lib.TrainState(tiny, model.init_params(tiny), 'adam')
    prefix = str(run / 'model-3')
    runs.save(state, prefix, {'step': 3})
    state_file = os.path.realpath(run / checkpoint.STATE_FILE)
    named = [i for i, e in enumerate(synced) if e[0] == 'replace' and e[2] == state_file]
    assert len(named) == 1, synced
    for final in (prefix + checkpoint.DATA_SUFFIX, prefix + '.index',
                  prefix + runs.SIDECAR_SUFFIX, str(run / 'hparams.json')):
        assert _durable_before(synced, final, named[0]), (final, synced)
    # The state file itself: fsynced before its rename, its folder after.
    assert _durable_before(synced, state_file, len(synced)), synced
    assert runs.load_state(prefix)[0] == {'step': 3}
    # checkpoint.save_params alone (no sidecar whose folder fsync would cover the renames).
    del synced[:]
    prefix = checkpoint.save_params(model.init_params(tiny), str(run / 'model-4'))
    named = [i for i, e in enumerate(synced) if e[0] == 'replace' and e[2] == state_file]
    for final in (prefix + checkpoint.DATA_SUFFIX, prefix + '.index'):
        assert _durable_before(synced, final, named[0]), (final, synced)


def test_write_file_is_atomic_and_durable(tmp_path, synced):
    """Catches: paths.write_file (behind hparams.json, samples, sidecars, vocab copies and the
    state file) without its fsyncs, or leaving its temporary file after a failed write."""
    path = tmp_path / 'sub' / 'f.txt'
    paths.write_file(str(path), 'héllo')
    assert path.read_text(encoding='utf-8') == 'héllo'
    assert _durable_before(synced, str(path), len(synced)), synced
    runs.copy_vocab(runs.ENCODER_DIR, str(tmp_path / 'run'))
    for name in runs.VOCAB_FILES:
        assert _durable_before(synced, str(tmp_path / 'run' / name), len(synced)), name

    def half_then_fail(f):
        f.write(b'half')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError):
        paths.write_file(str(path), half_then_fail)
    assert path.read_text(encoding='utf-8') == 'héllo'
    assert sorted(os.listdir(tmp_path / 'sub')) == ['f.txt']
