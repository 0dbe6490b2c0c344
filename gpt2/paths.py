"""Default folders, how a model name becomes a folder, and atomic writes of small files."""
import os
import tempfile

MODELS_DIR = 'models'          # download_model.py puts models/NAME here
CHECKPOINT_DIR = 'checkpoint'  # train.py writes checkpoint/RUN/model-STEP.*
SAMPLES_DIR = 'samples'        # samples/RUN/..., palimpsests
# OpenAI renamed its first two models after recounting their parameters: old name -> folder.
ALIASES = {'117M': '124M', '345M': '355M'}


def model_dir(name, models_dir=MODELS_DIR):
    """models/NAME, with the old names 117M and 345M meaning the folders they download into."""
    name = str(name)
    return os.path.join(str(models_dir), ALIASES.get(name.upper(), name))


def write_text(path, text):
    """Write `text` to `path` atomically: a temporary file in the same folder, renamed into place,
    so a crash never leaves a half-written file under the final name (folders are created)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
