"""A training run's folder: where its weights start from, its checkpoints with the training state
beside them (sidecars), and resuming from one exactly."""
import json
import os
import shutil
import uuid
import zipfile

import numpy as np
import tqdm

import encoder as encoder_lib
from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2 import paths
from gpt2 import settings
from gpt2.errors import UserError

SIDECAR_SUFFIX = '.train.npz'  # optimizer slots, step, sampler and RNG state beside model-STEP.*
VOCAB_FILES = ('encoder.json', 'vocab.bpe')
ENCODER_DIR = os.path.dirname(os.path.abspath(encoder_lib.__file__))


def folder(s):
    """The run folder of settings `s`: CHECKPOINT_DIR/RUN."""
    return os.path.join(s.checkpoint_dir, s.run_name)


def start(s):
    """Where settings `s` take the weights from -> (hparams, numpy params, prefix or None,
    vocab folder). Each hparams.json it consults is read once."""
    run_dir = folder(s)
    prefix = _restore_prefix(s, run_dir)
    model_dir = None if s.from_scratch else paths.model_dir(s.model_name, s.models_dir)
    if prefix is None and model_dir and not os.path.isfile(os.path.join(model_dir,
                                                                        hparams_lib.FILENAME)):
        raise UserError(f'model {s.model_name!r} is not downloaded (no {model_dir}): get it with '
                        f'`python download_model.py {s.model_name}`, or train with --from_scratch')
    read = _read_once()
    hp = _hparams(s, prefix, model_dir, read)
    known = os.path.join(run_dir, hparams_lib.FILENAME)
    if os.path.isfile(known) and s.restore_from != 'fresh' and read(known) != hp:
        raise UserError(f'run folder {run_dir} holds a model with hparams '
                        f'{read(known).to_dict()}, not {hp.to_dict()}: use another '
                        '--run_name, or the hparams it was trained with')
    if prefix is not None:
        params, hp, prefix = checkpoint.load_params(prefix, hparams=hp)
        return hp, params, prefix, os.path.dirname(prefix)
    if model_dir:
        model_hp = read(model_dir)
        if model_hp != hp:
            raise UserError(f'--hparams {hp.to_dict()} do not match {model_dir} '
                            f'({model_hp.to_dict()}); drop --hparams to fine-tune it')
        params, hp, prefix = checkpoint.load_params(model_dir, hparams=hp)
        return hp, params, prefix, model_dir
    return hp, model.init_params(hp, seed=s.seed), None, ENCODER_DIR


def _restore_prefix(s, run_dir):
    """The checkpoint --restore_from names: latest, the run's newest (None before its first);
    fresh, None; else the path's."""
    if s.restore_from == 'latest':
        if os.path.isdir(run_dir) and checkpoint.list_checkpoints(run_dir):
            return checkpoint.resolve(run_dir)
        return None
    if s.restore_from == 'fresh':
        return None
    return checkpoint.resolve(s.restore_from)


def _hparams(s, prefix, model_dir, read):
    """The model's shape: --hparams, else the hparams.json beside the checkpoint, else the model
    folder's."""
    if s.hparams is not None:
        return hparams_lib.get(s.hparams)
    if prefix is not None and os.path.isfile(checkpoint.hparams_path(prefix)):
        return read(checkpoint.hparams_path(prefix))
    if model_dir:
        return read(model_dir)
    raise UserError('--from_scratch needs --hparams: a preset '
                    f'({", ".join(hparams_lib.PRESETS)}) or an hparams.json')


def _read_once():
    """hparams_lib.load that reads each file once (known by its real path) and then remembers
    it: a resumed run's hparams.json is the checkpoint's and the run folder's."""
    seen = {}

    def read(path):
        file = os.path.join(path, hparams_lib.FILENAME) if os.path.isdir(path) else path
        key = os.path.realpath(file)
        if key not in seen:
            seen[key] = hparams_lib.load(path)
        return seen[key]
    return read


def sidecar_path(prefix):
    return prefix + SIDECAR_SUFFIX


def save(state, prefix, meta, *, keep=None, keep_optimizer_state=settings.LATEST):
    """model-STEP.* in OpenAI's format, then model-STEP.train.npz (slots and `meta`), and only then
    the `checkpoint` state file; each file is written under a temporary name, fsynced and renamed
    (paths.write_file), so a crash or a power cut at any point leaves the previous checkpoint the
    latest, whole. Then the older checkpoints are trimmed (retain)."""
    checkpoint.save_params(state.params, prefix, hparams=state.hparams, update_state=False)
    folder = os.path.dirname(prefix) or '.'
    # The variables themselves: np.savez turns each into an array only as it writes it, so the
    # slots are not copied all at once (for Adam, twice the weights).
    slots = state.slot_variables()
    paths.write_file(sidecar_path(prefix), lambda f: np.savez(
        f, __meta__=np.array(json.dumps(meta)), **slots))
    checkpoint.write_state(folder, prefix, keep=keep)
    retain(folder, prefix, keep=keep, keep_optimizer_state=keep_optimizer_state)
    return prefix


def retain(folder, newest, *, keep=None, keep_optimizer_state=settings.LATEST):
    """The retention policy once `newest` is saved and named in the state file: with `keep`, all
    but the newest `keep` checkpoints are deleted (never `newest`); with `keep_optimizer_state`
    'latest', the sidecars of the earlier steps are rewritten without their optimizer slots
    (drop_slots)."""
    listed = checkpoint.list_checkpoints(folder)
    if keep:
        gone = [p for p in listed[:-keep] if p != newest]
        for old in gone:
            for suffix in ('.index', checkpoint.DATA_SUFFIX, SIDECAR_SUFFIX):
                if os.path.exists(old + suffix):
                    os.remove(old + suffix)
        listed = [p for p in listed if p not in gone]
    step = checkpoint.step_of(newest)
    if keep_optimizer_state == settings.LATEST and step is not None:
        for old in listed:
            # Only earlier steps: a run restarted from an earlier checkpoint leaves the later ones
            # of its first history as they were until it saves over them.
            if old != newest and (checkpoint.step_of(old) or 0) < step:
                drop_slots(old)


def drop_slots(prefix):
    """Rewrite a checkpoint's sidecar without its optimizer slots (atomically): the step, data
    position, sampler and RNG state stay, a few KB instead of twice the weights for Adam. True if
    there were slots to drop; a missing or unreadable sidecar is left as it is."""
    path = sidecar_path(prefix)
    try:
        with np.load(path) as z:
            if not any(k.startswith('slot/') for k in z.files):
                return False
            meta = json.loads(str(z['__meta__']))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False
    meta['slots_dropped'] = True
    paths.write_file(path, lambda f: np.savez(f, __meta__=np.array(json.dumps(meta))))
    return True


def load_meta(prefix):
    """The meta (step, datasets, seed, ...) of a checkpoint's sidecar, without reading its
    optimizer slots (an .npz member is read only when asked for); None when it has none or it
    cannot be read."""
    try:
        with np.load(sidecar_path(prefix)) as z:
            return json.loads(str(z['__meta__']))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def load_state(prefix, *, slots=True):
    """(meta, slot arrays) from a checkpoint's sidecar, or (None, None) when it has none (a model
    from download_model.py, or a checkpoint from another trainer). A sidecar whose slots were
    dropped (drop_slots) gives meta['slots_dropped'] True and no slot arrays; without `slots`
    they are not read (None)."""
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None, None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z['__meta__']))
            slots = {k: z[k] for k in z.files if k != '__meta__'} if slots else None
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None
    return meta, slots


_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _unreadable(path, e):
    return UserError(f'{path} is not a readable training state: {e}; delete it to resume with a '
                     'fresh optimizer')


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.probe-{uuid.uuid4().hex}')
        with open(probe, 'w') as f:
            f.write('')
        os.remove(probe)
    except OSError as e:
        raise UserError(f'cannot write to the checkpoint folder {folder}: {e.strerror}; choose '
                        'another --checkpoint_dir or fix its permissions') from None


def copy_vocab(src_dir, run_dir):
    """The vocabulary files into the run folder (from src_dir, else the built-in ones), so the run
    folder is self-contained: sample.py needs nothing but it."""
    for name in VOCAB_FILES:
        dst = os.path.join(run_dir, name)
        src = os.path.join(src_dir, name)
        if not os.path.exists(dst):
            if not os.path.isfile(src):
                src = os.path.join(ENCODER_DIR, name)
            with open(src, 'rb') as f:
                paths.write_file(dst, lambda out: shutil.copyfileobj(f, out))


def vocab_folder(run_dir, vocab_dir):
    """The folder whose vocabulary a run encodes with: the run folder's own once it has one, else
    `vocab_dir` (the one its weights came with)."""
    return run_dir if os.path.isfile(os.path.join(run_dir, VOCAB_FILES[0])) else vocab_dir


def prepare(s, hparams, vocab_dir):
    """Make the run folder, with its hparams.json and vocabulary; returns the vocabulary folder
    to encode with (the run's own, once it has one)."""
    run_dir = folder(s)
    vocab_dir = vocab_folder(run_dir, vocab_dir)
    check_writable(run_dir)
    hparams_lib.save(hparams, os.path.join(run_dir, hparams_lib.FILENAME))
    copy_vocab(vocab_dir, run_dir)
    return vocab_dir


def meta(s, step, samplers, avg, hparams, state):
    """What a sidecar records beside the slots, to resume exactly."""
    return {'version': 1, 'step': step, 'seed': s.seed, 'optimizer': s.optimizer,
            'only_transformer': s.only_train_transformer_layers,
            'datasets': [p for p, _ in s.plan], 'samplers': [x.state() for x in samplers],
            'avg_loss': avg, 'hparams': hparams.to_dict(), 'precision': s.precision,
            'loss_scale': state.scaler_state()}


def resume(s, state, samplers, prefix):
    """Put the training state saved beside `prefix` into `state` and `samplers` (each where it
    can: another optimizer or other datasets start afresh, with a note) -> (step, avg loss)."""
    saved, _ = load_state(prefix, slots=False) if prefix else (None, None)
    if saved is None:
        own = prefix and os.path.dirname(prefix) == folder(s).rstrip('/')
        return (checkpoint.step_of(prefix) or 0) if own else 0, [0.0, 0.0]
    same = (saved['optimizer'], saved['only_transformer']) == (s.optimizer,
                                                               s.only_train_transformer_layers)
    if same and saved.get('slots_dropped') and state.slot_arrays():
        tqdm.tqdm.write(f'note: {prefix} keeps no optimizer state (only the newest checkpoint of '
                        'a run does, unless --keep_optimizer_state all); the optimizer starts '
                        'afresh, the step and data position resume')
    elif same:
        # Read a member at a time into its variable (not every slot first, then the variables).
        try:
            with np.load(sidecar_path(prefix)) as z:
                state.set_slots(z)
        except _UNREADABLE as e:
            raise _unreadable(sidecar_path(prefix), e) from None
    else:
        tqdm.tqdm.write(f'note: {prefix} was trained with --optimizer {saved["optimizer"]}; '
                        'starting the optimizer state afresh')
    # fp16's loss scale resumes where it was; another precision starts its own (the weights and
    # the optimizer state are float32 whatever the precision, so they carry over).
    if saved.get('precision', 'fp32') == s.precision and 'loss_scale' in saved:
        state.set_scaler(saved['loss_scale'])
    elif saved.get('precision', 'fp32') != s.precision:
        tqdm.tqdm.write(f'note: {prefix} was trained with --precision '
                        f'{saved.get("precision", "fp32")}; going on in {s.precision}')
    if saved['datasets'] == [p for p, _ in s.plan]:
        for sampler, st in zip(samplers, saved['samplers']):
            sampler.set_state(st)
    else:
        tqdm.tqdm.write('note: the datasets differ from the checkpoint\'s; sampling restarts')
    return saved['step'], saved.get('avg_loss', [0.0, 0.0])
