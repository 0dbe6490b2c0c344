"""gpt2/download.py against a local HTTP server (127.0.0.1 only) that injects faults on demand."""
import http.server
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gpt2 import checkpoint, download, model
from gpt2 import hparams as hparams_lib
from gpt2.errors import UserError
from tests.conftest import ROOT

NAME = '124M'
DATA = 'model.ckpt.data-00000-of-00001'
SCRIPT = os.path.join(ROOT, 'download_model.py')
TINY = hparams_lib.HParams(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=2)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """{file name: bytes} of a tiny model laid out like OpenAI's release, and its params."""
    params = model.init_params(TINY, seed=3)
    src = tmp_path_factory.mktemp('release')
    checkpoint.save_params(params, str(src / download.PREFIX), hparams=TINY)
    # Stand-ins: nothing here reads the graph or the vocabulary, only their bytes travel.
    (src / 'model.ckpt.meta').write_bytes(bytes(range(256)) * 40)
    (src / 'encoder.json').write_text('{"!": 0, "\\"": 1}')
    (src / 'vocab.bpe').write_text('#version: 0.2\nh e\n')
    files = {f: (src / f).read_bytes() for f in download.FILES}
    assert b'model.ckpt' in files['checkpoint'] and len(files[DATA]) > 100_000
    return files, params


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server.owner
        rng = self.headers.get('Range')
        srv.log.append((self.path, rng))
        faults = srv.faults.get(self.path)
        fault = faults.pop(0) if faults else None
        body = srv.files.get(self.path)
        if isinstance(fault, int):  # an HTTP status: 500, 503, 408, 429, 403
            return self.send_error(fault)
        if fault == 'silent':  # read the request, send nothing (until the server stops, 30 s)
            srv._stop.wait(30)
            return
        if body is None:
            return self.send_error(404)
        start = int(re.fullmatch(r'bytes=(\d+)-', rng).group(1)) if rng else 0
        if srv.ignore_range:
            start = 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(body)}')
            self.send_header('Content-Length', '0')
            return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.send_header('Content-Length', str(len(body) - start))
        self.end_headers()
        end = min(srv.cut.get(self.path, len(body)), len(body))  # a file cut short for good
        if isinstance(fault, tuple):  # ('drop' | 'short', n): this response stops after n bytes
            end = min(end, start + fault[1])
        self.wfile.write(body[start:end])
        if isinstance(fault, tuple) and fault[0] == 'drop':
            # A reset, not a clean close: the client's next read raises ConnectionResetError.
            time.sleep(0.2)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack('ii', 1, 0))
            self.rfile.close()
            self.connection.close()

    def log_message(self, *args):
        pass


class Server:
    """A threaded HTTP/1.0 server with Range support; serves until stopped or for 120 s at most."""

    def __init__(self, files, name=NAME):
        self.files = {f'/{name}/{k}': v for k, v in files.items()}
        self.faults = {}        # path -> one-shot faults: a status, 'silent', ('drop'|'short', n)
        self.cut = {}           # path -> byte every response stops at, for good
        self.ignore_range = False
        self.log = []           # (path, Range header or None) of every request
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.05
        self.httpd.owner = self
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.httpd.handle_request()

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.httpd.server_close()

    def path(self, file):
        return f'/{NAME}/{file}'

    def requests(self, file):
        return [r for p, r in self.log if p == self.path(file)]


@pytest.fixture(autouse=True)
def offline_env(monkeypatch):
    # A proxy from the environment must not see requests for 127.0.0.1; no mirror leaks in.
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)


@pytest.fixture
def server(release):
    s = Server(release[0])
    yield s
    s.close()


def fetch(server, tmp_path, name=NAME, **kw):
    kw = {'mirror': server.url, 'backoff': 0, 'timeout': 5, 'progress': False, **kw}
    return download.download(name, tmp_path / 'models', **kw)


def run_script(*args):
    env = dict(os.environ, NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost')
    env.pop(download.MIRROR_ENV, None)
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)


def assert_one_line_error(proc, *needles, bars=False):
    """Exit code 1 and the error as one line (after the progress bars, if any were drawn)."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith('download_model.py: error: ')]
    assert errors == lines[-1:] and 'Traceback' not in proc.stderr, proc.stderr
    assert bars or len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_download_loads_and_gives_the_source_logits(release, server, tmp_path):
    files, params = release
    folder = fetch(server, tmp_path)
    assert folder == os.path.join(tmp_path / 'models', NAME)
    for f, body in files.items():
        with open(os.path.join(folder, f), 'rb') as fh:
            assert fh.read() == body, f
    assert not [f for f in os.listdir(folder) if f.endswith(download.PART)]
    loaded, hp, prefix = checkpoint.load_params(folder)
    assert hp == TINY and prefix == os.path.join(folder, download.PREFIX)
    tokens = np.array([[5, 17, 96, 0, 42, 8]], np.int32)
    want, _ = model.forward(TINY, model.to_tensors(params), tokens)
    got, _ = model.forward(TINY, model.to_tensors(loaded), tokens)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_second_run_is_cheap_and_force_fetches_again(server, tmp_path, monkeypatch):
    folder = fetch(server, tmp_path)
    n = len(server.log)
    calls = []
    real_verify = download.verify
    monkeypatch.setattr(download, 'verify', lambda *a, **k: calls.append(a) or real_verify(*a, **k))
    fetch(server, tmp_path)
    assert len(server.log) == n and calls == []  # no request, no second read of the tensors
    # A checkpoint file touched since the last check is read again.
    st = os.stat(os.path.join(folder, DATA))
    os.utime(os.path.join(folder, DATA), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fetch(server, tmp_path)
    assert len(server.log) == n and len(calls) == 1
    fetch(server, tmp_path, force=True)
    assert len(server.log) == n + len(download.FILES) and len(calls) == 2
    assert all(r is None for _, r in server.log[n:])


def test_dropped_connection_resumes_with_range(release, server, tmp_path, capsys):
    server.faults[server.path(DATA)] = [('drop', 40_000)]
    folder = fetch(server, tmp_path, progress=True)
    assert 'connection lost after 40000 of' in capsys.readouterr().err  # a reset, not an EOF
    assert server.requests(DATA) == [None, 'bytes=40000-']
    with open(os.path.join(folder, DATA), 'rb') as f:
        assert f.read() == release[0][DATA]


def test_body_shorter_than_content_length_resumes(release, server, tmp_path, capsys):
    server.faults[server.path(DATA)] = [('short', 30_000), ('short', 5)]
    folder = fetch(server, tmp_path, progress=True)
    assert 'the response ended at byte 30000 of' in capsys.readouterr().err
    assert server.requests(DATA) == [None, 'bytes=30000-', 'bytes=30005-']
    checkpoint.load_params(folder)


def test_file_cut_short_for_good_never_takes_its_final_name(server, tmp_path):
    server.cut[server.path('hparams.json')] = 20
    with pytest.raises(UserError, match=r'failed after 3 tries: the response ended at byte 20 '
                                        r'of \d+.*hparams.json.part is kept'):
        fetch(server, tmp_path, retries=2)
    folder = tmp_path / 'models' / NAME
    assert not (folder / 'hparams.json').exists()
    assert (folder / 'hparams.json.part').stat().st_size == 20
    assert server.requests('hparams.json') == [None, 'bytes=20-', 'bytes=20-']


def test_server_error_is_retried(server, tmp_path):
    server.faults[server.path('encoder.json')] = [500, 500]
    fetch(server, tmp_path)
    assert server.requests('encoder.json') == [None, None, None]
    server.faults[server.path('vocab.bpe')] = [500] * 5
    with pytest.raises(UserError, match=r'vocab.bpe failed after 2 tries: HTTP 500'):
        fetch(server, tmp_path, force=True, retries=1)


def test_not_found_is_reported_at_once(server, tmp_path):
    del server.files[server.path('vocab.bpe')]
    with pytest.raises(UserError, match=rf'{server.url}/{NAME}/vocab.bpe not found \(HTTP 404\)'):
        fetch(server, tmp_path)
    assert server.requests('vocab.bpe') == [None]  # a 404 is not retried
    assert not os.path.exists(tmp_path / 'models' / NAME / 'vocab.bpe')


def test_complete_part_is_finished_by_a_416(release, server, tmp_path):
    folder = tmp_path / 'models' / NAME
    folder.mkdir(parents=True)
    (folder / 'vocab.bpe.part').write_bytes(release[0]['vocab.bpe'])
    fetch(server, tmp_path)
    assert server.requests('vocab.bpe') == [f'bytes={len(release[0]["vocab.bpe"])}-']
    assert (folder / 'vocab.bpe').read_bytes() == release[0]['vocab.bpe']


def test_part_longer_than_the_file_starts_again(release, server, tmp_path):
    folder = tmp_path / 'models' / NAME
    folder.mkdir(parents=True)
    body = release[0]['vocab.bpe']
    (folder / 'vocab.bpe.part').write_bytes(b'X' * (len(body) + 5))
    fetch(server, tmp_path)
    assert server.requests('vocab.bpe') == [f'bytes={len(body) + 5}-', None]
    assert (folder / 'vocab.bpe').read_bytes() == body


def test_server_ignoring_range_restarts_the_file(release, server, tmp_path):
    folder = tmp_path / 'models' / NAME
    folder.mkdir(parents=True)
    (folder / 'encoder.json.part').write_bytes(b'XXXX')  # would survive a wrong resume
    server.ignore_range = True
    fetch(server, tmp_path)
    assert server.requests('encoder.json') == ['bytes=4-']
    assert (folder / 'encoder.json').read_bytes() == release[0]['encoder.json']


def test_corrupt_byte_is_caught_by_the_crc_check(release, server, tmp_path):
    files = release[0]
    bad = bytearray(files[DATA])
    bad[len(bad) // 2] ^= 0x40
    server.files[server.path(DATA)] = bytes(bad)
    folder = tmp_path / 'models' / NAME
    proc = run_script(NAME, '--models_dir', tmp_path / 'models', '--mirror', server.url)
    assert_one_line_error(proc, 'corrupt', DATA, 'deleted', 'run the command again', bars=True)
    assert not (folder / DATA).exists() and not (folder / 'model.ckpt.index').exists()
    assert (folder / 'vocab.bpe').exists()
    # The next run fetches only what was deleted, and the model is whole again.
    server.files[server.path(DATA)] = files[DATA]
    n = len(server.log)
    fetch(server, tmp_path)
    assert sorted(p for p, _ in server.log[n:]) == [server.path(DATA),
                                                    server.path('model.ckpt.index')]
    checkpoint.load_params(folder)


def test_checkpoint_of_another_model_is_rejected(server, tmp_path):
    other = model.init_params(hparams_lib.HParams(97, 32, 32, 4, 1))
    prefix = tmp_path / 'other' / download.PREFIX
    checkpoint.save_params(other, str(prefix))
    for suffix in ('.data-00000-of-00001', '.index'):
        server.files[server.path(download.PREFIX + suffix)] = open(f'{prefix}{suffix}', 'rb').read()
    with pytest.raises(UserError, match='corrupt.*missing'):
        fetch(server, tmp_path)
    assert not (tmp_path / 'models' / NAME / 'model.ckpt.index').exists()


def test_no_network_suggests_a_mirror(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf'cannot reach 127.0.0.1:{port} after 2 tries.*--mirror'):
        download.download(NAME, tmp_path, mirror=f'http://127.0.0.1:{port}', retries=1,
                          backoff=0, timeout=5, progress=False)
    assert not os.path.exists(tmp_path / NAME / 'checkpoint')


def test_not_enough_space_is_reported_before_writing(server, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)._replace(free=10)
    monkeypatch.setattr(download.shutil, 'disk_usage', lambda path: usage)
    with pytest.raises(UserError, match='not enough disk space.*checkpoint.part'):
        fetch(server, tmp_path)
    assert not os.path.exists(tmp_path / 'models' / NAME / 'checkpoint')


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_disk_full_while_writing(server, tmp_path):
    folder = tmp_path / 'models' / NAME
    folder.mkdir(parents=True)
    os.symlink('/dev/full', folder / 'checkpoint.part')  # every write fails with ENOSPC
    with pytest.raises(UserError, match='disk is full while writing .*checkpoint.part'):
        fetch(server, tmp_path)
    assert not (folder / 'checkpoint').exists()


def test_old_names_land_in_the_new_folders(server, tmp_path):
    folder = fetch(server, tmp_path, name='117M')
    assert folder == os.path.join(tmp_path / 'models', '124M')
    assert {p.split('/')[1] for p, _ in server.log} == {'124M'}
    assert download.canonical_name('345M') == '355M'
    import download_model
    assert '117M in MODELS_DIR/124M' in download_model.main.__doc__
    assert '345M in MODELS_DIR/355M' in download_model.main.__doc__


def test_mirror_from_the_environment(server, tmp_path, monkeypatch):
    assert download.base_url() == download.BASE_URL  # configured only, never contacted here
    assert download.BASE_URL.startswith('https://openaipublic.blob.core.windows.net/gpt-2/')
    monkeypatch.setenv(download.MIRROR_ENV, server.url + '/')
    assert download.base_url() == server.url
    assert download.base_url('http://example.invalid/m') == 'http://example.invalid/m'
    download.download(NAME, tmp_path, backoff=0, timeout=5, progress=False)
    assert len(server.log) == len(download.FILES)


def test_file_mirror_resumes_a_part(release, tmp_path):
    mirror = tmp_path / 'mirror' / NAME
    mirror.mkdir(parents=True)
    for f, body in release[0].items():
        (mirror / f).write_bytes(body)
    folder = tmp_path / 'models' / NAME
    folder.mkdir(parents=True)
    # A marker in place of the first bytes: only a resumed copy keeps it.
    (folder / 'encoder.json.part').write_bytes(b'RESUMED')
    download.download(NAME, tmp_path / 'models', mirror=(tmp_path / 'mirror').as_uri(),
                      progress=False)
    assert (folder / 'encoder.json').read_bytes() == b'RESUMED' + release[0]['encoder.json'][7:]
    # A plain folder works too.
    download.download(NAME, tmp_path / 'again', mirror=str(tmp_path / 'mirror'), progress=False)
    with pytest.raises(UserError, match=r'not found in the mirror'):
        download.download('355M', tmp_path / 'again', mirror=str(tmp_path / 'mirror'),
                          progress=False)


@pytest.mark.parametrize('name, models_dir, mirror, message', [
    ('999M', 'models', None, "unknown model '999M': expected one of 124M, 355M, 774M, 1558M"),
    ('../x', 'models', None, "model name '../x' is not a plain folder name"),
    ('124M/../../x', 'models', None, 'would be written outside models_dir'),
    ('124M', 'afile', None, 'is a file, not a folder'),
    ('124M', 'afile/sub', None, 'cannot create the model folder'),
    ('124M', 'models', 'ftp://example.invalid/m', "--mirror 'ftp://example.invalid/m' is not"),
])
def test_bad_input_is_one_clear_error(tmp_path, name, models_dir, mirror, message):
    (tmp_path / 'afile').write_text('')
    with pytest.raises(UserError, match=re.escape(message)):
        download.download(name, tmp_path / models_dir, mirror=mirror, progress=False)
    assert sorted(os.listdir(tmp_path)) == ['afile']  # nothing created, inside or out


def test_script_errors_are_one_line(tmp_path):
    (tmp_path / 'afile').write_text('')
    assert_one_line_error(run_script('999M', '--models_dir', tmp_path), 'unknown model',
                          '124M, 355M, 774M, 1558M')
    assert_one_line_error(run_script('../x', '--models_dir', tmp_path), 'plain folder name')
    assert_one_line_error(run_script('124M', '--models_dir', tmp_path / 'afile'), 'is a file')
    assert sorted(os.listdir(tmp_path)) == ['afile']


# ---- the retry promises: backoff 1, 2, 4, 8, 16 s; 5 retries in a row; what counts as transient

def fetch_one(server, tmp_path, file, **kw):
    """download.fetch of one file, recording the waits through its `sleep` hook (none is slept)."""
    sleeps = []
    kw = {'timeout': 5, 'progress': False, **kw}
    try:
        download.fetch(f'{server.url}/{NAME}/{file}', str(tmp_path / file), sleep=sleeps.append,
                       **kw)
    except UserError as e:
        return sleeps, e
    return sleeps, None


def test_backoff_doubles_from_1_s_and_gives_up_after_5_retries_in_a_row(
        release, server, tmp_path):
    """Catches: another schedule (BACKOFF or the doubling changed), MAX_BACKOFF not capping it,
    or a retry count other than RETRIES = 5."""
    server.faults[server.path('vocab.bpe')] = [500] * 5
    sleeps, error = fetch_one(server, tmp_path, 'vocab.bpe')
    assert error is None and sleeps == [1, 2, 4, 8, 16]
    assert (tmp_path / 'vocab.bpe').read_bytes() == release[0]['vocab.bpe']
    server.faults[server.path('encoder.json')] = [500] * 6
    sleeps, error = fetch_one(server, tmp_path, 'encoder.json')
    assert sleeps == [1, 2, 4, 8, 16]
    assert 'encoder.json failed after 6 tries: HTTP 500' in str(error)
    assert server.requests('encoder.json') == [None] * 6
    assert not (tmp_path / 'encoder.json').exists()
    server.faults[server.path('hparams.json')] = [503] * 8
    sleeps, error = fetch_one(server, tmp_path, 'hparams.json', retries=7)
    assert sleeps == [1, 2, 4, 8, 16, 30, 30] and error  # at most MAX_BACKOFF


def test_a_request_that_brought_bytes_resets_the_retry_count(release, server, tmp_path):
    """Catches: failures counted over the whole download instead of in a row (8 failures here,
    but never more than 4 in a row: a connection that keeps dropping must still finish)."""
    server.faults[server.path(DATA)] = [500, 500, 500, ('drop', 20_000), 500, 500, 500, 500]
    sleeps, error = fetch_one(server, tmp_path, DATA)
    assert error is None, error
    assert sleeps == [1, 2, 4, 1, 2, 4, 8, 16]
    assert server.requests(DATA) == [None] * 4 + ['bytes=20000-'] * 5
    assert (tmp_path / DATA).read_bytes() == release[0][DATA]


@pytest.mark.parametrize('status, retried', [(408, True), (429, True), (503, True),
                                             (403, False)])
def test_408_and_429_are_retried_like_5xx(release, server, tmp_path, status, retried):
    """Catches: 408 (request timeout) or 429 (too many requests) taken out of the retried set,
    or a 4xx that no retry can fix (403) retried."""
    server.faults[server.path('vocab.bpe')] = [status, status]
    sleeps, error = fetch_one(server, tmp_path, 'vocab.bpe')
    if retried:
        assert error is None and sleeps == [1, 2]
        assert server.requests('vocab.bpe') == [None] * 3
        assert (tmp_path / 'vocab.bpe').read_bytes() == release[0]['vocab.bpe']
    else:
        assert sleeps == [] and server.requests('vocab.bpe') == [None]
        assert f'refused the download (HTTP {status}' in str(error)


def test_a_server_that_sends_nothing_times_out_and_is_retried(release, server, tmp_path, capsys):
    """Catches: no timeout on the request (it would wait for the silent server's 30 s and then
    report a closed connection, not a timeout), or a timeout not counted as transient."""
    server.faults[server.path('vocab.bpe')] = ['silent']
    sleeps, error = fetch_one(server, tmp_path, 'vocab.bpe', timeout=0.5, progress=True)
    assert error is None and sleeps == [1]
    assert 'vocab.bpe: cannot connect (timed out); retrying in 1 s' in capsys.readouterr().err
    assert server.requests('vocab.bpe') == [None, None]
    assert (tmp_path / 'vocab.bpe').read_bytes() == release[0]['vocab.bpe']


def test_a_truncated_data_file_from_the_mirror_is_deleted_and_reported(release, server, tmp_path):
    """Catches: verify letting the reader's IndexError (a data file shorter than its index, as a
    mirror holding a half-finished copy serves it) out as a traceback, or keeping the files."""
    server.files[server.path(DATA)] = release[0][DATA][:5000]
    with pytest.raises(UserError, match=r'checkpoint .*model.ckpt is corrupt \(.*\); deleted '
                                        r'.*model.ckpt.data-00000-of-00001 and .*index'):
        fetch(server, tmp_path)
    assert not (tmp_path / 'models' / NAME / DATA).exists()


def test_a_downloaded_file_is_on_the_disk_before_it_takes_its_name(server, tmp_path, monkeypatch):
    """Catches: the .part renamed without an fsync first (a power cut could leave an empty file
    under the final name, which the next run would skip as complete), or the folder not fsynced."""
    if not os.path.isdir('/proc/self/fd'):
        pytest.skip('needs /proc/self/fd to name what an fd is')
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(
        ('fsync', os.readlink(f'/proc/self/fd/{fd}'))) or real_fsync(fd))
    monkeypatch.setattr(os, 'replace', lambda a, b: events.append(
        ('replace', os.path.realpath(a), os.path.realpath(b))) or real_replace(a, b))
    dest = os.path.realpath(tmp_path / 'vocab.bpe')
    download.fetch(f'{server.url}/{NAME}/vocab.bpe', dest, progress=False)
    i = events.index(('replace', dest + download.PART, dest))
    assert ('fsync', dest + download.PART) in events[:i], events
    assert ('fsync', os.path.dirname(dest)) in events[i + 1:], events
