"""Default folders, how a model name becomes a folder, and atomic, durable writes of files."""
import contextlib
import errno
import os
import uuid

MODELS_DIR = 'models'          # download_model.py puts models/NAME here
CHECKPOINT_DIR = 'checkpoint'  # train.py writes checkpoint/RUN/model-STEP.*
SAMPLES_DIR = 'samples'        # samples/RUN/..., palimpsests
# OpenAI renamed its first two models after recounting their parameters: old name -> folder.
ALIASES = {'117M': '124M', '345M': '355M'}


def model_dir(name, models_dir=MODELS_DIR):
    """models/NAME, with the old names 117M and 345M meaning the folders they download into."""
    name = str(name)
    return os.path.join(str(models_dir), ALIASES.get(name.upper(), name))


def write_file(path, content):
    """Write `content` to `path` atomically and durably (see writing); `content` is str (UTF-8),
    bytes, or a function that writes into the binary file object it is given (np.savez,
    shutil.copyfileobj)."""
    with writing(path) as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode('utf-8') if isinstance(content, str) else content)


@contextlib.contextmanager
def writing(path, *, text=False):
    """A file object (binary, or UTF-8 text with `text`) through which `path` is written: the one
    way this project writes a file. It goes to a hidden temporary name in the same folder; when
    the block ends it is flushed and fsynced, renamed into place, and the folder is fsynced, so a
    crash never leaves a half-written file under the final name, and a power cut just after
    cannot leave an empty one. Folders are created; on any error the temporary file is removed
    and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp')
    try:
        # 0o666 less the umask, as open() gives (mkstemp would make every file 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with (os.fdopen(fd, 'w', encoding='utf-8', newline='') if text else
              os.fdopen(fd, 'wb')) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path, synced=True)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    """write_file for text (kept for its callers: hparams, samples, palimpsests, stamps)."""
    write_file(path, text)


def replace(src, dst, *, synced=False):
    """os.replace(src, dst) made durable: src's bytes reach the disk before the rename (unless
    `synced` says they already did), and the folder's new entry after it."""
    if not synced:
        fsync_file(src)
    os.replace(src, dst)
    fsync_folder(os.path.dirname(os.path.abspath(dst)))


def fsync_file(path):
    """Flush a closed file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder):
    """Flush a folder's entries (creations, renames, removals) to the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform where folders cannot be opened (Windows): nothing to flush
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems (network, FUSE) cannot fsync a folder; the file itself was fsynced.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
