"""OpenAI-format TensorFlow checkpoints: find them, load them into the tree, save them atomically.

Variables are named as in OpenAI's release (`model/h0/attn/c_attn/w`); the tree path of a variable
is its name split on '/', with `h0` meaning params['h'][0]. Files are the TF V2 bundle (`.index` and
`.data-00000-of-00001`) that TF1's train.Saver reads and writes, plus the `checkpoint` state
file, so OpenAI's and nshepperd's code load what we save and we load theirs.
"""
import glob
import os
import re
import uuid

import numpy as np
import tensorflow as tf

from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2 import paths
from gpt2.errors import UserError

SCOPE = 'model'
STATE_FILE = 'checkpoint'  # TensorFlow's name for the file that points at the latest checkpoint
DATA_SUFFIX = '.data-00000-of-00001'
_STEP = re.compile(r'-(\d+)$')
# Optimizer slots that TF1 training code saves beside the weights: not part of the model.
_SLOT_SUFFIXES = ('/Adam', '/Adam_1', '/Momentum', '/RMSProp', '/RMSProp_1')


def map_named(fn, tree):
    """The tree with each leaf replaced by fn(checkpoint name, leaf)."""
    def visit(node, path):
        if isinstance(node, dict):
            return {k: visit(v, f'{path}/{k}') for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [visit(v, f'{path}{i}') for i, v in enumerate(node)]  # params['h'][0]: h0
        return fn(path, node)
    return visit(tree, SCOPE)


def flatten(params):
    """Tree -> {checkpoint name: leaf}."""
    flat = {}
    map_named(flat.__setitem__, params)
    return flat


def shapes(hparams):
    """{checkpoint name: shape} of every variable a model with these hparams has."""
    return {k: list(p.shape) for k, p in flatten(model.spec(hparams)).items()}


def unflatten(flat, hparams):
    """{checkpoint name: leaf} -> tree (names must be exactly those of `shapes(hparams)`)."""
    return map_named(lambda name, _: flat[name], model.spec(hparams))


def step_of(prefix):
    """The step in a prefix like checkpoint/run1/model-200 (None for models/124M/model.ckpt)."""
    m = _STEP.search(prefix)
    return int(m.group(1)) if m else None


def _exists(prefix):
    return os.path.isfile(prefix + '.index')


def _read_state(folder):
    """Prefixes listed in a folder's `checkpoint` file, oldest first, latest last."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        return []
    latest, listed = None, []
    with open(path, encoding='utf-8') as f:
        for line in f:
            m = re.match(r'\s*(model_checkpoint_path|all_model_checkpoint_paths):\s*"(.*)"', line)
            if m:
                p = m.group(2) if os.path.isabs(m.group(2)) else os.path.join(folder, m.group(2))
                if m.group(1) == 'model_checkpoint_path':
                    latest = p
                elif p not in listed:
                    listed.append(p)
    if latest:
        listed = [p for p in listed if p != latest] + [latest]
    return listed


def list_checkpoints(folder):
    """Every checkpoint prefix in a run folder, sorted by step (files on disk, not just the state
    file, so a run whose state file lists only the newest few still shows its whole history)."""
    if not os.path.isdir(folder):
        raise UserError(f'no such folder: {folder}')
    found = {os.path.join(folder, f[:-len('.index')]) for f in os.listdir(folder)
             if f.endswith('.index') and not f.startswith('.')}
    found = [p for p in found if os.path.isfile(p + DATA_SUFFIX)]
    return sorted(found, key=lambda p: (step_of(p) is None, step_of(p) or 0, p))


def resolve(path):
    """A model folder, a run folder (its latest checkpoint) or a checkpoint prefix -> prefix."""
    path = os.fspath(path)
    if _exists(path):
        return path
    if path.endswith('.index') and _exists(path[:-len('.index')]):
        return path[:-len('.index')]
    if os.path.isdir(path):
        state = [p for p in _read_state(path) if _exists(p)]
        if state:
            return state[-1]
        found = list_checkpoints(path)
        if found:
            return found[-1]
        raise UserError(f'{path} holds no checkpoint (no *.index file and no `checkpoint` file); '
                        'train first, or download a model with download_model.py')
    raise UserError(f'no checkpoint at {path}: expected a model folder (models/124M), a run folder '
                    '(checkpoint/run1) or a checkpoint prefix (checkpoint/run1/model-200)')


def hparams_path(prefix):
    """Where the hparams.json beside a checkpoint is."""
    return os.path.join(os.path.dirname(prefix) or '.', hparams_lib.FILENAME)


def find_hparams(prefix):
    """hparams.json beside a checkpoint, else None."""
    path = hparams_path(prefix)
    return hparams_lib.load(path) if os.path.isfile(path) else None


def load_params(path, hparams=None):
    """Load a checkpoint into the tree of NumPy arrays; returns (params, hparams, prefix).

    `hparams` defaults to the hparams.json beside the checkpoint. Every missing or unexpected
    variable and every shape mismatch is reported together in one UserError, and so is a damaged
    data file (cut short, or failing its checksum), naming the file.
    """
    prefix = resolve(path)
    if hparams is None:
        hparams = find_hparams(prefix)
        if hparams is None:
            raise UserError(f'no {hparams_lib.FILENAME} beside {prefix}; pass hparams explicitly')
    try:
        reader = tf.train.load_checkpoint(prefix)
        found = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as e:
        raise UserError(f'cannot read checkpoint {prefix}: {_first_line(e)}') from None
    expected = shapes(hparams)
    check_names(expected, found, source=prefix, hparams=hparams)
    _check_data_size(prefix, found, dtypes)
    flat = {}
    for name in expected:
        try:
            flat[name] = reader.get_tensor(name)
        # A data file cut short (if the size check let it by) raises IndexError from the reader;
        # bytes that changed raise an OpError, of code UNKNOWN on TF 2.21, about the checksum.
        except (tf.errors.OpError, IndexError, ValueError, RuntimeError) as e:
            why = (f'fails the checksum of {name} (its bytes are not those saved)'
                   if 'checksum' in str(e).lower() else f'cannot give {name} ({_first_line(e)})')
            raise UserError(f'checkpoint {prefix} is damaged: {_data_name(prefix)} {why}; copy it '
                            'again or use another checkpoint') from None
    return unflatten(flat, hparams), hparams, prefix


def _data_name(prefix):
    return os.path.basename(prefix) + DATA_SUFFIX


def _check_data_size(prefix, found, dtypes):
    """UserError when the data file is missing or shorter than the tensors the index lists (a
    copy that did not finish): the reader's own error for that is a 30-line IndexError."""
    shards = glob.glob(glob.escape(prefix) + '.data-*-of-*')
    if not shards:
        raise UserError(f'checkpoint {prefix} is damaged: {_data_name(prefix)} is missing (only '
                        'the .index is there); copy it again or use another checkpoint')
    if shards != [prefix + DATA_SUFFIX] or not all(
            d.is_numpy_compatible and d != tf.string for d in dtypes.values()):
        return  # several shards or variable-size tensors: the reader checks those
    want = sum(int(np.prod(found[k], dtype=np.int64)) * dtypes[k].size for k in found)
    have = os.path.getsize(shards[0])
    if have < want:
        raise UserError(f'checkpoint {prefix} is damaged: {_data_name(prefix)} is {have} bytes, '
                        f'the index expects {want} (a copy that did not finish?); copy it again '
                        'or use another checkpoint')


def check_names(expected, found, *, source, hparams=None):
    """Raise one UserError listing every missing/unexpected name and shape mismatch."""
    found = {k: v for k, v in found.items()
             if k.startswith(SCOPE + '/') and not k.endswith(_SLOT_SUFFIXES)}
    problems = mismatches(expected, found)
    if not problems:
        return
    hint = f' for hparams {hparams.to_dict()}' if hparams else ''
    raise UserError(f'checkpoint {source} does not match the model{hint}: {problems}. Are the '
                    'hparams those the checkpoint was trained with?')


def mismatches(expected, found):
    """'2 missing (a, b); 1 unexpected (c); 1 with the wrong shape (d is [3], expected [4])' for
    two {name: shape} maps, or '' when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f'{k} is {list(found[k])}, expected {list(expected[k])}'
             for k in sorted(set(expected) & set(found)) if list(found[k]) != list(expected[k])]
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing ({_some(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({_some(unexpected)})')
    if wrong:
        parts.append(f'{len(wrong)} with the wrong shape ({_some(wrong)})')
    return '; '.join(parts)


def save_params(params, prefix, *, hparams=None, update_state=True):
    """Write the tree as an OpenAI-format checkpoint at `prefix`, atomically.

    Tensors go to a hidden temporary prefix first and are renamed into place (data, then index),
    and only then is the `checkpoint` state file replaced, so a crash at any point leaves the
    previous checkpoint and the state file as they were. With `hparams`, checks every shape first
    and writes hparams.json beside the checkpoint if it is not there yet.
    """
    # Variables are read as tensors (no copy), not made NumPy arrays: at 1558M a copy of every
    # weight would be 6.2 GB more at each save.
    flat = {k: tf.convert_to_tensor(v) if isinstance(v, (tf.Tensor, tf.Variable)) else
            np.asarray(v) for k, v in flatten(params).items()}
    if hparams is not None:
        check_names(shapes(hparams), {k: v.shape for k, v in flat.items()}, source='params',
                    hparams=hparams)
    folder = os.path.dirname(prefix) or '.'
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.tmp-{uuid.uuid4().hex}')
    names = sorted(flat)
    try:
        tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[''] * len(names),
                          tensors=[flat[k] for k in names])
        # Both files reach the disk before either takes its name; the folder after the renames.
        for suffix in (DATA_SUFFIX, '.index'):
            paths.fsync_file(tmp + suffix)
        os.replace(tmp + DATA_SUFFIX, prefix + DATA_SUFFIX)
        os.replace(tmp + '.index', prefix + '.index')
        paths.fsync_folder(folder)
    finally:
        for leftover in (tmp + DATA_SUFFIX, tmp + '.index'):
            if os.path.exists(leftover):
                os.remove(leftover)
    if hparams is not None and not os.path.exists(os.path.join(folder, hparams_lib.FILENAME)):
        hparams_lib.save(hparams, os.path.join(folder, hparams_lib.FILENAME))
    if update_state:
        write_state(folder, prefix)
    return prefix


def write_state(folder, latest, *, keep=None):
    """Point the `checkpoint` file at `latest`, listing every checkpoint still on disk (atomic and
    durable: call it only once the files it names are on the disk)."""
    listed = [p for p in list_checkpoints(folder) if p != latest] + [latest]
    if keep:
        listed = listed[-keep:]
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    text = f'model_checkpoint_path: "{rel(latest)}"\n' + ''.join(
        f'all_model_checkpoint_paths: "{rel(p)}"\n' for p in listed)
    paths.write_file(os.path.join(folder, STATE_FILE), text)


def _some(items, n=4):
    return ', '.join(items[:n]) + (f', ... and {len(items) - n} more' if len(items) > n else '')


def _first_line(e):
    msg = getattr(e, 'message', None) or str(e)
    return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
