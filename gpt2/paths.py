"""Default folders, and how a model name or run name becomes a folder."""
import os

MODELS_DIR = 'models'          # download_model.py puts models/NAME here
CHECKPOINT_DIR = 'checkpoint'  # train.py writes checkpoint/RUN/model-STEP.*
SAMPLES_DIR = 'samples'        # samples/RUN/..., palimpsests
# OpenAI renamed its first two models after recounting their parameters: old name -> folder.
ALIASES = {'117M': '124M', '345M': '355M'}


def model_dir(name, models_dir=MODELS_DIR):
    """models/NAME, with the old names 117M and 345M meaning the folders they download into."""
    name = str(name)
    return os.path.join(str(models_dir), ALIASES.get(name.upper(), name))
