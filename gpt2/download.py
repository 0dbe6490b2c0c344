"""Fetching OpenAI's GPT-2 releases: resumable, retried downloads, checked before they are kept.

Each file streams into FILE.part and takes its final name only when its size matches the server's;
then every tensor of the checkpoint is read once so TensorFlow checks its CRC against the index.
"""
import errno
import http.client
import json
import os
import pathlib
import re
import shutil
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from gpt2 import hparams as hparams_lib
from gpt2 import paths
from gpt2.errors import UserError

# The address openai/gpt-2's download_model.py fetches from: a file is BASE_URL/NAME/FILE.
BASE_URL = 'https://openaipublic.blob.core.windows.net/gpt-2/models'
MIRROR_ENV = 'GPT2_MIRROR'
MODELS = ('124M', '355M', '774M', '1558M')
ALIASES = paths.ALIASES
FILES = ('checkpoint', 'encoder.json', 'hparams.json', 'model.ckpt.data-00000-of-00001',
         'model.ckpt.index', 'model.ckpt.meta', 'vocab.bpe')
PREFIX = 'model.ckpt'
CHECKPOINT_FILES = (PREFIX + '.data-00000-of-00001', PREFIX + '.index')
PART = '.part'
# Sizes and mtimes of the files the last successful check read, so a second run skips the check.
STAMP = '.verified.json'
RETRIES = 5          # retries after failed requests in a row (none bringing a byte)
BACKOFF = 1.0        # seconds before the first retry; doubles each time, at most MAX_BACKOFF
MAX_BACKOFF = 30.0
TIMEOUT = 60.0       # seconds without a byte before a connection counts as dropped
CHUNK = 1 << 20

# Failures of the connection, not of the disk: these are retried (and resumed).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                   TimeoutError, socket.timeout)
_RETRY_STATUS = (408, 429)  # besides every 5xx


class _Transient(Exception):
    """A failure worth another try: a dropped connection, a timeout, a 5xx."""

    def __init__(self, message, *, unreachable=False):
        super().__init__(message)
        self.unreachable = unreachable  # no response at all: the network or the host is down


def canonical_name(name):
    """'124M' -> '124M', '117M' -> '124M'; UserError for anything but a released model."""
    name = str(name)
    valid = f'{", ".join(MODELS)} (or the old names {", ".join(ALIASES)})'
    if (not name or name in ('.', '..') or '/' in name or '\\' in name or os.path.isabs(name)
            or os.path.basename(name) != name):
        raise UserError(f'model name {name!r} is not a plain folder name and would be written '
                        f'outside models_dir; expected one of {valid}')
    key = name.upper()
    if key in ALIASES:
        return ALIASES[key]
    if key not in MODELS:
        raise UserError(f'unknown model {name!r}: expected one of {valid}')
    return key


def base_url(mirror=None):
    """The address files are fetched from: `mirror`, else $GPT2_MIRROR, else OpenAI's."""
    env = os.environ.get(MIRROR_ENV)
    url, source = (mirror, '--mirror') if mirror else (env, MIRROR_ENV) if env else (BASE_URL, '')
    url = str(url)
    if os.path.isdir(url):  # a plain local folder is the same as its file:// address
        return pathlib.Path(url).resolve().as_uri()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ('http', 'https', 'file'):
        raise UserError(f'{source} {url!r} is not an http://, https:// or file:// address nor an '
                        'existing folder; give the base that holds NAME/FILE, e.g. '
                        f'{BASE_URL} or file:///data/gpt-2/models')
    return url.rstrip('/')


def model_folder(models_dir, model):
    """models_dir/model, created if missing; UserError where a file stands in the way."""
    models_dir = os.fspath(models_dir)
    folder = os.path.join(models_dir, model)
    for path in (models_dir, folder):
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f'models_dir {models_dir!r} cannot hold the model: {path} is a file, '
                            'not a folder; pass --models_dir a folder (it is created if missing)')
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the model folder {folder}: {e.strerror or e}; pass '
                        '--models_dir a folder you can write to') from None
    return folder


def download(name, models_dir=paths.MODELS_DIR, *, mirror=None, force=False, retries=RETRIES,
             backoff=BACKOFF, timeout=TIMEOUT, progress=True):
    """Fetch a released model into models_dir/NAME and check it; returns the folder.

    Files already under their final name are kept (they were size-checked when they arrived);
    `force` downloads every file again, replacing each one only once its new copy is complete.
    """
    model = canonical_name(name)
    base = base_url(mirror)
    folder = model_folder(models_dir, model)
    if model != str(name):
        _say(progress, f'{name} is the old name of {model}: downloading into {folder}')
    if force:
        _remove(os.path.join(folder, STAMP))
    fetched = []
    for file in FILES:
        dest = os.path.join(folder, file)
        if os.path.isfile(dest) and not force:
            _say(progress, f'{file}: already complete')
            continue
        if force:
            _remove(dest + PART)
        fetch(f'{base}/{model}/{file}', dest, retries=retries, backoff=backoff, timeout=timeout,
              progress=progress)
        fetched.append(file)
    if fetched or not _stamp_matches(folder):
        verify(folder, progress=progress)
    return folder


def fetch(url, dest, *, retries=RETRIES, backoff=BACKOFF, timeout=TIMEOUT, progress=True,
          sleep=time.sleep):
    """Download `url` to `dest` through `dest.part`, resuming with Range requests after a drop.

    Gives up after `retries` failed requests in a row; a request that brought bytes resets the
    count, so a connection that keeps dropping still finishes. Returns the size.
    """
    part = dest + PART
    failures = 0
    bar = None

    def show(total, start):  # one bar per file, made once the size is known, reset on a restart
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=start, desc=os.path.basename(dest), unit='B',
                       unit_scale=True, unit_divisor=1024, disable=not progress, file=sys.stderr,
                       dynamic_ncols=True)
        else:
            bar.reset(total=total)
            bar.update(start)
        return bar

    try:
        while True:
            before = _size(part)
            try:
                total = _attempt(url, part, timeout=timeout, show=show)
                break
            except _Transient as e:
                failures = 1 if _size(part) > before else failures + 1
                if failures > retries:
                    raise UserError(_give_up(url, e, retries, part)) from None
                wait = min(backoff * 2 ** (failures - 1), MAX_BACKOFF)
                _say(progress, f'{os.path.basename(dest)}: {e}; retrying in {wait:g} s')
                sleep(wait)
    finally:
        if bar is not None:
            bar.close()
    # fsynced first: after a power cut an empty file under the final name would count as done.
    paths.replace(part, dest)
    return total


def _attempt(url, part, *, timeout, show):
    """One request appending to `part`; returns the file's size once `part` holds all of it."""
    offset = _size(part)
    stream, start, total = _open(url, offset, timeout)
    if stream is None:  # 416: nothing left to send
        if offset == total:
            return total
        _remove(part)
        raise _Transient(f'the server has no byte {offset} of a {total}-byte file; starting '
                         'again')
    with stream:
        _check_space(part, total, start)
        bar = show(total, start)
        got = start
        try:
            # 'wb' when the server ignored the Range header (or there was no part): start afresh.
            with open(part, 'ab' if start else 'wb') as f:
                while total is None or got < total:
                    try:
                        chunk = stream.read1(CHUNK) if hasattr(stream, 'read1') else \
                            stream.read(CHUNK)
                    except _NETWORK_ERRORS as e:
                        raise _Transient(f'connection lost after {got} of {total} bytes '
                                         f'({_reason(e)})') from None
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except OSError as e:  # the disk's errors: the network's became _Transient above
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f'the disk is full while writing {part}; free some space (or '
                                'use another --models_dir) and run again: the download resumes '
                                'from what is already there') from None
            raise
    if total is not None and got != total:
        if got > total:
            _remove(part)
        # A body shorter than its Content-Length: the connection closed early.
        raise _Transient(f'the response ended at byte {got} of {total}')
    return got


def _open(url, offset, timeout):
    """-> (stream positioned at `start`, start, total size), or (None, None, total) for a 416."""
    if urllib.parse.urlsplit(url).scheme.lower() == 'file':
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
        if not os.path.isfile(path):
            raise UserError(f'{path} not found in the mirror (expected the layout NAME/FILE, '
                            f'as under {BASE_URL})')
        f = open(path, 'rb')
        total = os.fstat(f.fileno()).st_size
        start = offset if offset <= total else 0
        f.seek(start)
        return f, start, total
    request = urllib.request.Request(url, headers={'Accept-Encoding': 'identity'})
    if offset:
        request.add_header('Range', f'bytes={offset}-')
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # the part reaches the end already (or is longer than the file)
            m = re.fullmatch(r'bytes \*/(\d+)', e.headers.get('Content-Range', '').strip())
            return None, None, int(m.group(1)) if m else None
        if e.code >= 500 or e.code in _RETRY_STATUS:
            raise _Transient(f'HTTP {e.code} {e.reason}') from None
        if e.code == 404:
            raise UserError(f'{url} not found (HTTP 404): check the model name, or that the '
                            'mirror holds NAME/FILE like the official address') from None
        raise UserError(f'{url} refused the download (HTTP {e.code} {e.reason})') from None
    except _NETWORK_ERRORS as e:
        if isinstance(getattr(e, 'reason', None), ssl.SSLCertVerificationError):
            # Trying again cannot fix a certificate; a proxy or an old CA bundle usually can.
            raise UserError(f'cannot verify the certificate of {url} ({_reason(e)}); fix the '
                            'system\'s CA certificates or proxy, or use --mirror') from None
        raise _Transient(f'cannot connect ({_reason(e)})', unreachable=True) from None
    length = response.headers.get('Content-Length')
    if response.status == 206:
        m = re.fullmatch(r'bytes (\d+)-\d+/(\d+|\*)',
                         response.headers.get('Content-Range', '').strip())
        if not m:
            response.close()
            raise _Transient('the server answered a Range request without a valid Content-Range')
        start = int(m.group(1))
        total = int(m.group(2)) if m.group(2) != '*' else None
        if start != offset:
            response.close()
            raise _Transient(f'the server resumed at byte {start}, not {offset}')
        return response, start, total
    return response, 0, int(length) if length is not None else None


def _check_space(part, total, start):
    if total is None:
        return
    free = shutil.disk_usage(os.path.dirname(part) or '.').free
    if total - start > free:
        raise UserError(f'not enough disk space for {part}: {_mb(total - start)} more needed, '
                        f'{_mb(free)} free; free some space (or use another --models_dir) and '
                        'run again')


def verify(folder, *, progress=True):
    """Read hparams.json and every tensor once (TensorFlow checks each CRC); delete what is bad.

    Raises UserError naming the damage and the deleted files; on success records the files'
    sizes and times so the next run need not read them again.
    """
    # TensorFlow loads here, not at import: bad names and flags fail without a 2 s wait.
    import numpy as np

    from gpt2 import checkpoint, quiet
    quiet.import_tensorflow()
    import tensorflow as tf

    hparams_path = os.path.join(folder, hparams_lib.FILENAME)
    try:
        hparams = hparams_lib.load(hparams_path)
    except UserError as e:
        _remove(hparams_path)
        raise UserError(f'the downloaded {hparams_path} is damaged ({e}); it was deleted: run the '
                        'command again to download it again') from None
    prefix = os.path.join(folder, PREFIX)
    try:
        reader = tf.train.load_checkpoint(prefix)
        found = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
        checkpoint.check_names(checkpoint.shapes(hparams), found, source=prefix, hparams=hparams)
        sizes = {k: int(np.prod(v)) * dtypes[k].size for k, v in found.items()}
        with tqdm(total=sum(sizes.values()), desc='checking tensors', unit='B', unit_scale=True,
                  unit_divisor=1024, disable=not progress, file=sys.stderr) as bar:
            for name in sorted(found):
                reader.get_tensor(name)  # raises DataLoss on a CRC mismatch
                bar.update(sizes[name])
    # A data file shorter than its index (a mirror's half-finished copy): IndexError.
    except (tf.errors.OpError, ValueError, UserError, IndexError) as e:
        damaged = [os.path.join(folder, f) for f in CHECKPOINT_FILES]
        for path in damaged:
            _remove(path)
        _remove(os.path.join(folder, STAMP))
        why = ('the data file is shorter than its index says' if isinstance(e, IndexError)
               else _first_line(e))
        raise UserError(f'the downloaded checkpoint {prefix} is corrupt ({why}); '
                        f'deleted {" and ".join(damaged)}: run the command again to download '
                        'them again') from None
    _write_stamp(folder)
    _say(progress, f'checked every tensor of {prefix}')


def _stamp_files(folder):
    return {f: _signature(os.path.join(folder, f))
            for f in CHECKPOINT_FILES + (hparams_lib.FILENAME,)}


def _signature(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _stamp_matches(folder):
    try:
        with open(os.path.join(folder, STAMP), encoding='utf-8') as f:
            return json.load(f) == _stamp_files(folder)
    except (OSError, ValueError):
        return False


def _write_stamp(folder):
    path = os.path.join(folder, STAMP)
    paths.write_text(path, json.dumps(_stamp_files(folder)))


def _give_up(url, error, retries, part):
    tries = f'after {retries + 1} tries'
    if error.unreachable:
        host = urllib.parse.urlsplit(url).netloc
        return (f'cannot reach {host} {tries}: {error}; check the network connection, or point '
                f'--mirror (or ${MIRROR_ENV}) at a copy of the files')
    kept = f'; {part} is kept and the next run resumes it' if _size(part) else ''
    return (f'downloading {url} failed {tries}: {error}{kept}; try again later, or use --mirror '
            f'(or ${MIRROR_ENV}) with a copy of the files')


def _reason(e):
    reason = getattr(e, 'reason', None) or e
    return getattr(reason, 'strerror', None) or str(reason) or type(reason).__name__


def _first_line(e):
    msg = (getattr(e, 'message', None) or str(e)).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _mb(n):
    return f'{n / 2 ** 20:,.1f} MiB'


def _say(progress, message):
    if progress:
        tqdm.write(message, file=sys.stderr)
