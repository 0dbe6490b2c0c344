"""Which checkpoint a sample.py command reads: the one --model_name, --run_name or --checkpoint
names, or the run folder --run_name names; and the encoder beside a checkpoint."""
import os

import encoder as encoder_lib
from gpt2 import checkpoint
from gpt2 import paths
from gpt2.errors import UserError


def path(s):
    """The path settings.SampleSettings `s` name: --checkpoint, the run --run_name, or the model
    --model_name (124M when none is given)."""
    if s.checkpoint is not None:
        return str(s.checkpoint)
    if s.run_name is not None:
        return _run_dir(s)
    return paths.model_dir('124M' if s.model_name is None else s.model_name, s.models_dir)


def load(s):
    """(params, hparams, prefix, encoder) of the checkpoint `path(s)` names."""
    params, hparams, prefix = checkpoint.load_params(path(s))
    return params, hparams, prefix, encoder(prefix)


def run_folder(s):
    """The run folder --run_name names under --checkpoint_dir (None without --run_name)."""
    if s.run_name is None:
        return None
    run_dir = _run_dir(s)
    if not os.path.isdir(run_dir):
        raise UserError(f'no run folder {run_dir} (from --run_name {s.run_name} under '
                        f'--checkpoint_dir {s.checkpoint_dir})')
    return run_dir


def _run_dir(s):
    return os.path.join(str(s.checkpoint_dir), str(s.run_name))


def encoder(prefix):
    """The encoder of a checkpoint's folder: its own encoder.json and vocab.bpe if it has them,
    else GPT-2's."""
    return encoder_lib.get_encoder(os.path.dirname(prefix) or '.')
