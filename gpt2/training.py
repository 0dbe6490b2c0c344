"""Training: the next-token loss, optimizers as pure per-leaf update rules, the compiled train step,
learning-rate schedules, and the loop that saves exactly resumable checkpoints."""
import json
import math
import numbers
import os
import shutil
import signal
import threading
import time
import uuid
import zipfile

import numpy as np
import tensorflow as tf
import tqdm
from tensorflow.core.framework import summary_pb2

import encoder as encoder_lib
from gpt2 import checkpoint
from gpt2 import dataset as dataset_lib
from gpt2 import fast
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2 import novelty
from gpt2 import sampling
from gpt2.errors import UserError
from gpt2 import paths

# Defaults shared by train.py and the library (train.py imports these, never retypes them).
CHECKPOINT_DIR = paths.CHECKPOINT_DIR
SAMPLE_DIR = paths.SAMPLES_DIR
MODELS_DIR = paths.MODELS_DIR
MODEL_NAME = '124M'
RUN_NAME = 'run1'
RESTORE_FROM = 'latest'
COMBINE = 50000  # characters per joined text chunk (nshepperd's default)
BATCH_SIZE = 1
LEARNING_RATE = 1e-4
OPTIMIZER = 'adam'
LR_SCHEDULE = 'constant'
SAVE_EVERY = 1000
SAMPLE_EVERY = 100
SAMPLE_LENGTH = 200
SAMPLE_NUM = 1
VAL_BATCH_SIZE = 2
VAL_BATCH_COUNT = 40
ADAMW_WEIGHT_DECAY = 0.01  # PyTorch's AdamW default; the other optimizers default to none
# XLA fuses the step's elementwise work: on CPU it trained 1.6x faster in 0.3x less memory than
# TF's own kernels at the 124M shape (BENCHMARKS.md).
JIT_COMPILE = True

SIDECAR_SUFFIX = '.train.npz'  # optimizer slots, step, sampler and RNG state beside model-STEP.*
# --keep_optimizer_state: the optimizer slots (for Adam twice the weights) stay in the newest
# checkpoint's sidecar only, or in every checkpoint's.
LATEST, ALL = 'latest', 'all'
KEEP_OPTIMIZER_STATE = LATEST
VOCAB_FILES = ('encoder.json', 'vocab.bpe')
SCHEDULES = ('constant', 'linear', 'cosine')
_ENCODER_DIR = os.path.dirname(os.path.abspath(encoder_lib.__file__))


# ---------------------------------------------------------------- loss

def loss_and_grads(hparams, params, windows, *, names=None, recompute=False, inputs=None):
    """windows [batch, seq+1] -> (loss, {checkpoint name: gradient}) for the leaves in `names`
    (all by default). The loss predicts windows[:, 1:] from windows[:, :-1] (or from `inputs`,
    the noised copy of windows[:, :-1])."""
    flat = checkpoint.flatten(params)
    names = sorted(flat) if names is None else names
    with tf.GradientTape() as tape:
        leaves = {k: tf.convert_to_tensor(v) for k, v in flat.items()}
        tape.watch([leaves[k] for k in names])
        tree = checkpoint.unflatten(leaves, hparams)
        x = windows[:, :-1] if inputs is None else inputs
        loss = model.loss(hparams, tree, x, windows[:, 1:],
                          block_fn=fast.recomputed(model.block) if recompute else model.block)
    grads = tape.gradient(loss, [leaves[k] for k in names])
    return loss, {k: tf.convert_to_tensor(g) for k, g in zip(names, grads)}


# ---------------------------------------------------------------- optimizers
# Each rule is pure: init(shape) -> {slot: zeros}, update(g, p, slots, lr, t, wd) -> (p, slots),
# with t the 1-based step. State is the slots tree, so saving it and loading it is exact.

def _decays(name):
    # Weight decay on matrices and embeddings only, not on biases or layer-norm gains (nanoGPT, HF).
    return name.endswith('/w') or name in ('model/wte', 'model/wpe')


class _Adam:
    """Adam (Kingma & Ba) with bias correction; weight decay is L2 (added to the gradient) or, for
    AdamW, decoupled (p *= 1 - lr*wd), as in PyTorch's torch.optim.Adam/AdamW."""
    b1, b2, eps = 0.9, 0.999, 1e-8

    def __init__(self, decoupled):
        self.decoupled = decoupled

    def init(self, shape):
        return {'m': np.zeros(shape, np.float32), 'v': np.zeros(shape, np.float32)}

    def update(self, g, p, s, lr, t, wd):
        if wd and not self.decoupled:
            g = g + wd * p
        m = self.b1 * s['m'] + (1 - self.b1) * g
        v = self.b2 * s['v'] + (1 - self.b2) * tf.square(g)
        step = (m / (1 - self.b1 ** t)) / (tf.sqrt(v / (1 - self.b2 ** t)) + self.eps)
        if wd and self.decoupled:
            p = p * (1 - lr * wd)
        return p - lr * step, {'m': m, 'v': v}


class _SGD:
    """Plain stochastic gradient descent (L2 weight decay if asked)."""

    def init(self, shape):
        return {}

    def update(self, g, p, s, lr, t, wd):
        return p - lr * (g + wd * p if wd else g), {}


class _Adafactor:
    """Adafactor (Shazeer & Stern 2018) without momentum: second moments factored into row and
    column means for matrices ([1, nx, nf] and embeddings), decay 1 - t^-0.8, update clipped to
    RMS 1, decoupled weight decay, and the learning rate given (no relative step size)."""
    eps, clip = 1e-30, 1.0

    def init(self, shape):
        if len(shape) >= 2:
            return {'vr': np.zeros(shape[:-1], np.float32),
                    'vc': np.zeros(tuple(shape[:-2]) + tuple(shape[-1:]), np.float32)}
        return {'v': np.zeros(shape, np.float32)}

    def update(self, g, p, s, lr, t, wd):
        decay = 1 - tf.pow(t, -0.8)
        g2 = tf.square(g) + self.eps
        if 'vr' in s:
            vr = decay * s['vr'] + (1 - decay) * tf.reduce_mean(g2, -1)
            vc = decay * s['vc'] + (1 - decay) * tf.reduce_mean(g2, -2)
            row = vr / tf.reduce_mean(vr, -1, keepdims=True)
            u = g * tf.math.rsqrt(row[..., None] * vc[..., None, :])
            new = {'vr': vr, 'vc': vc}
        else:
            v = decay * s['v'] + (1 - decay) * g2
            u = g * tf.math.rsqrt(v)
            new = {'v': v}
        u = u / tf.maximum(1.0, tf.sqrt(tf.reduce_mean(tf.square(u))) / self.clip)
        if wd:
            p = p * (1 - lr * wd)
        return p - lr * u, new


OPTIMIZERS = {'adam': lambda: _Adam(False), 'adamw': lambda: _Adam(True), 'sgd': _SGD,
              'adafactor': _Adafactor}


def get_optimizer(name):
    if name not in OPTIMIZERS:
        raise UserError(f'unknown optimizer {name!r}: expected one of {", ".join(OPTIMIZERS)}')
    return OPTIMIZERS[name]()


def default_weight_decay(optimizer):
    return ADAMW_WEIGHT_DECAY if optimizer == 'adamw' else 0.0


def scheduled_lr(step, *, base, schedule='constant', warmup=0, total=None):
    """The rate for 0-based `step`: linear warmup over `warmup` steps, then constant, or a linear or
    cosine decay to zero at step `total`."""
    if schedule not in SCHEDULES:
        raise UserError(f'unknown --lr_schedule {schedule!r}: expected one of '
                        f'{", ".join(SCHEDULES)}')
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == 'constant':
        return base
    if not total:
        raise UserError(f'--lr_schedule {schedule} decays to zero at --steps: give --steps')
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == 'linear':
        return base * (1 - frac)
    return base * 0.5 * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------- state and the step

class TrainState:
    """The trainable state as variables: `params` (the model tree), `slots` ({checkpoint name:
    {slot: variable}} for the trained leaves only) and `names` (the trained leaves)."""

    def __init__(self, hparams, params, optimizer, *, only_transformer=False):
        self.hparams = hparams
        self.optimizer = optimizer
        self.rule = get_optimizer(optimizer)
        self.params = tf.nest.map_structure(
            lambda a: tf.Variable(a, dtype=tf.float32, trainable=False), params)
        flat = checkpoint.flatten(self.params)
        # nshepperd's --only_train_transformer_layers: the blocks (/h), not wte, wpe or ln_f.
        self.names = sorted(k for k in flat if not only_transformer or k.startswith('model/h'))
        self.slots = {k: {s: tf.Variable(z, trainable=False)
                          for s, z in self.rule.init(tuple(flat[k].shape)).items()}
                      for k in self.names}

    def slot_arrays(self):
        """{'slot/<slot>/<name>': array}, the optimizer state as saved in the sidecar."""
        return {f'slot/{s}/{k}': v.numpy() for k, d in self.slots.items() for s, v in d.items()}

    def set_slots(self, arrays):
        """Load slot_arrays() output; raises UserError on missing names or wrong shapes."""
        want = self.slot_arrays()
        bad = [k for k in want if k not in arrays or arrays[k].shape != want[k].shape]
        if bad:
            raise UserError(f'optimizer state does not match this run ({len(bad)} slots missing or '
                            f'of another shape, e.g. {bad[0]}); resume with the same --optimizer '
                            'and --only_train_transformer_layers, or --restore_from fresh')
        for k, d in self.slots.items():
            for s, v in d.items():
                v.assign(arrays[f'slot/{s}/{k}'])


def make_train_step(hparams, optimizer=OPTIMIZER, *, weight_decay=0.0, max_grad_norm=None,
                    recompute=False, noise=0.0, jit_compile=JIT_COMPILE):
    """A compiled step(state, windows, lr, t, seed) -> loss that updates state in place.

    windows [accumulate, batch, seq+1] int32: gradients are averaged over the leading axis (the
    accumulation micro-batches), so 2 x batch 2 gives what 1 x batch 4 gives. lr (float32) and t
    (the 1-based step, float32) are tensors, so every step reuses one trace; seed [2] int32 seeds
    the token noise statelessly, so a resumed run draws the same noise.
    """
    rule = get_optimizer(optimizer)

    @tf.function(jit_compile=jit_compile)
    def step(params, slots, windows, lr, t, seed):
        names = sorted(slots)
        inputs = windows[:, :, :-1]
        if noise:
            # nshepperd's --noise: replace input tokens (never targets) at random with any token.
            shape = tf.shape(inputs)
            hit = tf.random.stateless_uniform(shape, seed) < noise
            rand = tf.random.stateless_uniform(shape, seed + 1, maxval=hparams.n_vocab,
                                               dtype=tf.int32)
            inputs = tf.where(hit, rand, inputs)
        n = windows.shape[0]
        loss, grads = loss_and_grads(hparams, params, windows[0], names=names,
                                     recompute=recompute, inputs=inputs[0])
        grads = [grads[k] for k in names]
        if n > 1:
            for i in tf.range(1, n):
                # Accumulation micro-batches in a loop (not unrolled), so only one micro-batch's
                # activations are alive at a time.
                li, gi = loss_and_grads(hparams, params, windows[i], names=names,
                                        recompute=recompute, inputs=inputs[i])
                loss += li
                grads = [a + gi[k] for a, k in zip(grads, names)]
            loss = loss / n
            grads = [g / n for g in grads]
        if max_grad_norm:
            grads, _ = tf.clip_by_global_norm(grads, max_grad_norm)
        flat = checkpoint.flatten(params)
        for k, g in zip(names, grads):
            wd = weight_decay if _decays(k) else 0.0
            p, s = rule.update(g, flat[k].read_value(), {a: v.read_value() for a, v in
                                                         slots[k].items()}, lr, t, wd)
            flat[k].assign(p)
            for a, v in s.items():
                slots[k][a].assign(v)
        return loss

    def call(state, windows, lr, t, seed):
        return step(state.params, state.slots, tf.constant(windows, tf.int32),
                    tf.constant(lr, tf.float32), tf.constant(t, tf.float32),
                    tf.constant(seed, tf.int32))

    call.tracing_count = step.experimental_get_tracing_count
    call.optimized_hlo = lambda state, windows: step.experimental_get_compiler_ir(
        state.params, state.slots, tf.constant(windows, tf.int32), tf.constant(1e-4),
        tf.constant(1.0), tf.constant([0, 0]))(stage='optimized_hlo')  # for tests
    return call


def make_eval_step(hparams, *, jit_compile=JIT_COMPILE):
    """A compiled loss(params, windows [batch, seq+1]) -> mean next-token cross-entropy."""
    @tf.function(jit_compile=jit_compile)
    def step(params, windows):
        # Gradients are not taken here, so the plain loss, not the fused twin that works them out.
        h, _ = model.hidden(hparams, params, windows[:, :-1])
        h = tf.reshape(model.norm(h, params['ln_f']), [-1, hparams.n_embd])
        return model.cross_entropy.plain(h, params['wte'], tf.reshape(windows[:, 1:], [-1]))
    return lambda params, windows: step(params, tf.constant(windows, tf.int32))


# ---------------------------------------------------------------- data and curriculum

def parse_curriculum(spec):
    """'a.npz:1000,b.npz:1000' -> [('a.npz', 1000), ('b.npz', 1000)] (steps on each, in order);
    'a.txt,b.txt' -> [('a.txt', None), ('b.txt', None)] (swap to the next at every save)."""
    items = [s.strip() for s in str(spec).split(',') if s.strip()]
    out = []
    for item in items:
        path, _, count = item.rpartition(':')
        if path and count.isdigit() and int(count) > 0:
            out.append((path, int(count)))
        elif path and count.strip().lstrip('-').isdigit():
            raise UserError(f'--curriculum entry {item!r}: the step count must be positive')
        else:
            out.append((item, None))
    if not out:
        raise UserError(f'--curriculum {spec!r} names no dataset: expected "a.npz:1000,b.npz:1000" '
                        'or "a.txt,b.txt" (swap at every save)')
    if len({n is None for _, n in out}) > 1:
        raise UserError(f'--curriculum {spec!r} mixes entries with and without step counts: give '
                        'every entry a count ("a:1000,b:500") or none (swap at every save)')
    return out


class Curriculum:
    """Which dataset step s (0-based) trains on: by step counts (each dataset for its count of
    steps, the last one after that), or, without counts, the next dataset (cycling) after every
    save. A function of the step alone, so a resumed run is on the same dataset."""

    def __init__(self, counts, save_every):
        self.counts = counts
        self.save_every = save_every
        if counts[0] is None and len(counts) > 1 and not save_every:
            raise UserError('a --curriculum that swaps at every save needs --save_every > 0')

    def index(self, step):
        if len(self.counts) == 1:
            return 0
        if self.counts[0] is None:
            return (step // self.save_every) % len(self.counts)
        end = 0
        for i, n in enumerate(self.counts):
            end += n
            if step < end:
                return i
        return len(self.counts) - 1

    def total(self):
        """Steps until the last counted dataset ends (None when swapping at saves)."""
        return None if self.counts[0] is None else sum(self.counts)


# ---------------------------------------------------------------- checkpoints with training state

def sidecar_path(prefix):
    return prefix + SIDECAR_SUFFIX


def save_training_state(state, prefix, meta, *, keep=None, keep_optimizer_state=LATEST):
    """model-STEP.* in OpenAI's format, then model-STEP.train.npz (slots and `meta`), and only then
    the `checkpoint` state file; each file is written under a temporary name, fsynced and renamed
    (paths.write_file), so a crash or a power cut at any point leaves the previous checkpoint the
    latest, whole.

    Then, with `keep_optimizer_state` 'latest', the older checkpoints' sidecars are rewritten
    without their optimizer slots (see drop_slots); with `keep`, all but the newest `keep`
    checkpoints are deleted.
    """
    checkpoint.save_params(state.params, prefix, hparams=state.hparams, update_state=False)
    folder = os.path.dirname(prefix) or '.'
    slots = state.slot_arrays()
    paths.write_file(sidecar_path(prefix), lambda f: np.savez(
        f, __meta__=np.array(json.dumps(meta)), **slots))
    checkpoint.write_state(folder, prefix, keep=keep)
    if keep:
        for old in checkpoint.list_checkpoints(folder)[:-keep]:
            if old != prefix:
                for suffix in ('.index', checkpoint.DATA_SUFFIX, SIDECAR_SUFFIX):
                    if os.path.exists(old + suffix):
                        os.remove(old + suffix)
    if keep_optimizer_state == LATEST:
        step = checkpoint.step_of(prefix)
        for old in checkpoint.list_checkpoints(folder):
            # Only older steps: a run restarted from an earlier checkpoint leaves the later ones
            # of its first history as they were until it saves over them.
            if old != prefix and step is not None and (checkpoint.step_of(old) or 0) < step:
                drop_slots(old)
    return prefix


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


def load_training_state(prefix):
    """(meta, slot arrays) from a checkpoint's sidecar, or (None, None) when it has none (a model
    from download_model.py, or a checkpoint from another trainer). A sidecar whose slots were
    dropped (drop_slots) gives meta['slots_dropped'] True and no slot arrays."""
    path = sidecar_path(prefix)
    if not os.path.isfile(path):
        return None, None
    try:
        with np.load(path) as z:
            meta = json.loads(str(z['__meta__']))
            slots = {k: z[k] for k in z.files if k != '__meta__'}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f'{path} is not a readable training state: {e}; delete it to resume '
                        'with a fresh optimizer') from None
    return meta, slots


# ---------------------------------------------------------------- the loop

class _Stop:
    """Ctrl-C / SIGTERM set a flag the loop reads between steps (the step in flight finishes and
    is saved); a second signal interrupts at once."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _scalar(name, value, step):
    # tf.summary.scalar lives in the tensorboard package; this is what it writes, without it.
    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = 'scalars'
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=meta)


def _check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f'.probe-{uuid.uuid4().hex}')
        with open(probe, 'w') as f:
            f.write('')
        os.remove(probe)
    except OSError as e:
        raise UserError(f'cannot write to the checkpoint folder {folder}: {e.strerror}; choose '
                        'another --checkpoint_dir or fix its permissions') from None


def _copy_vocab(src_dir, run_dir):
    # The run folder is self-contained: sample.py needs nothing but it.
    for name in VOCAB_FILES:
        dst = os.path.join(run_dir, name)
        src = os.path.join(src_dir, name)
        if not os.path.exists(dst):
            if not os.path.isfile(src):
                src = os.path.join(_ENCODER_DIR, name)
            with open(src, 'rb') as f:
                paths.write_file(dst, lambda out: shutil.copyfileobj(f, out))


def _start(*, model_name, models_dir, from_scratch, hparams, run_dir, restore_from, seed):
    """Where the weights come from -> (hparams, numpy params, prefix or None, vocab folder)."""
    prefix = None
    if restore_from == 'latest':
        if os.path.isdir(run_dir) and checkpoint.list_checkpoints(run_dir):
            prefix = checkpoint.resolve(run_dir)
    elif restore_from != 'fresh':
        prefix = checkpoint.resolve(restore_from)
    model_dir = None if from_scratch else paths.model_dir(model_name, models_dir)
    if prefix is None and model_dir and not os.path.isfile(os.path.join(model_dir,
                                                                        hparams_lib.FILENAME)):
        raise UserError(f'model {model_name!r} is not downloaded (no {model_dir}): get it with '
                        f'`python download_model.py {model_name}`, or train with --from_scratch')
    if hparams is not None:
        hp = hparams_lib.get(hparams)
    elif prefix is not None and checkpoint.find_hparams(prefix):
        hp = checkpoint.find_hparams(prefix)
    elif model_dir:
        hp = hparams_lib.load(model_dir)
    else:
        raise UserError('--from_scratch needs --hparams: a preset '
                        f'({", ".join(hparams_lib.PRESETS)}) or an hparams.json')
    known = os.path.join(run_dir, hparams_lib.FILENAME)
    if os.path.isfile(known) and restore_from != 'fresh' and hparams_lib.load(known) != hp:
        raise UserError(f'run folder {run_dir} holds a model with hparams '
                        f'{hparams_lib.load(known).to_dict()}, not {hp.to_dict()}: use another '
                        '--run_name, or the hparams it was trained with')
    if prefix is not None:
        params, hp, prefix = checkpoint.load_params(prefix, hparams=hp)
        vocab = os.path.dirname(prefix)
    elif model_dir:
        model_hp = hparams_lib.load(model_dir)
        if model_hp != hp:
            raise UserError(f'--hparams {hp.to_dict()} do not match {model_dir} '
                            f'({model_hp.to_dict()}); drop --hparams to fine-tune it')
        params, hp, prefix = checkpoint.load_params(model_dir, hparams=hp)
        vocab = model_dir
    else:
        params, vocab = model.init_params(hp, seed=seed), _ENCODER_DIR
    return hp, params, prefix, vocab


def train(dataset=None, *, model_name=MODEL_NAME, models_dir=MODELS_DIR, from_scratch=False,
          hparams=None, run_name=RUN_NAME, checkpoint_dir=CHECKPOINT_DIR, sample_dir=SAMPLE_DIR,
          restore_from=RESTORE_FROM, steps=None, batch_size=BATCH_SIZE, seq_len=None,
          learning_rate=LEARNING_RATE, lr_schedule=LR_SCHEDULE, warmup_steps=0,
          optimizer=OPTIMIZER, weight_decay=None, max_grad_norm=None, accumulate_gradients=1,
          memory_saving_gradients=False, only_train_transformer_layers=False, noise=0.0,
          sample_every=SAMPLE_EVERY, sample_length=SAMPLE_LENGTH, sample_num=SAMPLE_NUM,
          save_every=SAVE_EVERY, max_checkpoints=None, val_dataset=None, val_every=0,
          val_batch_size=VAL_BATCH_SIZE, val_batch_count=VAL_BATCH_COUNT, seed=0,
          curriculum=None, combine=COMBINE, jit_compile=JIT_COMPILE,
          keep_optimizer_state=KEEP_OPTIMIZER_STATE, progress=True):
    """Train until step `steps` (the global step, so a resumed run stops at the same place), the
    end of the curriculum, or Ctrl-C/SIGTERM; see train.py for every option.

    Returns {'step', 'prefix' (the last checkpoint), 'losses' (this call's), 'run_dir'}.
    """
    get_optimizer(optimizer)
    unset = {'steps', 'seq_len', 'max_checkpoints', 'weight_decay', 'max_grad_norm'}  # None ok
    for name, v, lo in (('batch_size', batch_size, 1), ('accumulate_gradients',
                        accumulate_gradients, 1), ('save_every', save_every, 0),
                        ('sample_every', sample_every, 0), ('val_every', val_every, 0),
                        ('warmup_steps', warmup_steps, 0), ('sample_length', sample_length, 1),
                        ('sample_num', sample_num, 1), ('val_batch_size', val_batch_size, 1),
                        ('val_batch_count', val_batch_count, 1), ('combine', combine, 1),
                        ('seed', seed, 0), ('steps', steps, 0), ('seq_len', seq_len, 1),
                        ('max_checkpoints', max_checkpoints, 1)):
        if (v is not None or name not in unset) and (
                not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise UserError(f'--{name} must be an integer >= {lo}, got {v!r}')
    # Comparisons alone let NaN through (NaN < 0 is False), and a rate of -1 trains uphill.
    for name, v, ok, want in (
            ('learning_rate', learning_rate, lambda x: x > 0, 'a finite number > 0'),
            ('weight_decay', weight_decay, lambda x: x >= 0, 'a finite number >= 0'),
            ('max_grad_norm', max_grad_norm, lambda x: x > 0,
             'a finite number > 0 (leave it out for no clipping)'),
            ('noise', noise, lambda x: 0 <= x < 1, 'a probability in [0, 1)')):
        if (v is not None or name not in unset) and not (
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and ok(v)):
            raise UserError(f'--{name} must be {want}, got {v!r}')
    if keep_optimizer_state not in (LATEST, ALL):
        raise UserError(f'--keep_optimizer_state must be {LATEST} (the newest checkpoint keeps '
                        f'the optimizer state) or {ALL} (every checkpoint), got '
                        f'{keep_optimizer_state!r}')
    weight_decay = default_weight_decay(optimizer) if weight_decay is None else weight_decay
    if curriculum and dataset:
        raise UserError('give --dataset or --curriculum, not both')
    if not (curriculum or dataset):
        raise UserError('no training data: give --dataset (a .npz, text file, folder or glob) or '
                        '--curriculum "a.npz:1000,b.npz:1000"')
    plan = parse_curriculum(curriculum) if curriculum else [(dataset, None)]
    order = Curriculum([n for _, n in plan], save_every)
    total = steps if steps is not None else order.total()
    learning_rate_at = lambda s: scheduled_lr(s, base=learning_rate,  # noqa: E731
                                              schedule=lr_schedule, warmup=warmup_steps,
                                              total=total)
    learning_rate_at(0)

    run_dir = os.path.join(checkpoint_dir, run_name)
    hp, params, prefix, vocab_dir = _start(
        model_name=model_name, models_dir=models_dir, from_scratch=from_scratch, hparams=hparams,
        run_dir=run_dir, restore_from=restore_from, seed=seed)
    seq = hp.n_ctx if seq_len is None else seq_len
    if not 1 <= seq <= hp.n_ctx:
        raise UserError(f'--seq_len must be in 1..n_ctx ({hp.n_ctx}), got {seq!r}')
    if os.path.isfile(os.path.join(run_dir, VOCAB_FILES[0])):
        vocab_dir = run_dir
    enc = encoder_lib.get_encoder(None if vocab_dir == _ENCODER_DIR else vocab_dir)
    samplers = [dataset_lib.Sampler(dataset_lib.load_chunks(p, enc, combine=combine), seq + 1,
                                    seed=seed + i) for i, (p, _) in enumerate(plan)]
    val_batches = []
    if val_dataset and val_every:
        val_batches = dataset_lib.validation_batches(
            dataset_lib.load_chunks(val_dataset, enc, combine=combine), seq + 1, val_batch_size,
            val_batch_count)

    _check_writable(run_dir)
    hparams_lib.save(hp, os.path.join(run_dir, hparams_lib.FILENAME))
    _copy_vocab(vocab_dir, run_dir)

    state = TrainState(hp, params, optimizer, only_transformer=only_train_transformer_layers)
    del params
    step, avg = 0, [0.0, 0.0]
    names = [p for p, _ in plan]
    meta, slots = load_training_state(prefix) if prefix else (None, None)
    if meta is not None:
        step = meta['step']
        avg = meta.get('avg_loss', avg)
        same = (meta['optimizer'], meta['only_transformer']) == (optimizer,
                                                                 only_train_transformer_layers)
        if same and meta.get('slots_dropped') and state.slot_arrays():
            tqdm.tqdm.write(f'note: {prefix} keeps no optimizer state (only the newest checkpoint '
                            'of a run does, unless --keep_optimizer_state all); the optimizer '
                            'starts afresh, the step and data position resume')
        elif same:
            state.set_slots(slots)
        else:
            tqdm.tqdm.write(f'note: {prefix} was trained with --optimizer {meta["optimizer"]}; '
                            'starting the optimizer state afresh')
        if meta['datasets'] == names:
            for s, st in zip(samplers, meta['samplers']):
                s.set_state(st)
        else:
            tqdm.tqdm.write('note: the datasets differ from the checkpoint\'s; sampling restarts')
    elif prefix and os.path.dirname(prefix) == run_dir.rstrip('/'):
        step = checkpoint.step_of(prefix) or 0

    def save():
        meta = {'version': 1, 'step': step, 'seed': seed, 'optimizer': optimizer,
                'only_transformer': only_train_transformer_layers, 'datasets': names,
                'samplers': [s.state() for s in samplers], 'avg_loss': avg,
                'hparams': hp.to_dict()}
        return save_training_state(state, os.path.join(run_dir, f'model-{step}'), meta,
                                   keep=max_checkpoints,
                                   keep_optimizer_state=keep_optimizer_state)

    train_step = make_train_step(hp, optimizer, weight_decay=weight_decay,
                                 max_grad_norm=max_grad_norm, recompute=memory_saving_gradients,
                                 noise=noise, jit_compile=jit_compile)
    eval_step = make_eval_step(hp, jit_compile=jit_compile) if val_batches else None
    writer = tf.summary.create_file_writer(run_dir)
    losses, saved, last = [], None, prefix
    tokens = batch_size * accumulate_gradients * seq
    bar = tqdm.tqdm(total=total, initial=step, disable=not progress, dynamic_ncols=True,
                    unit='step')
    try:
        with _Stop() as stop, writer.as_default():
            while (total is None or step < total) and stop.signal is None:
                s = samplers[order.index(step)]
                windows = s.batch(batch_size * accumulate_gradients).reshape(
                    accumulate_gradients, batch_size, seq + 1)
                lr = learning_rate_at(step)
                t0 = time.perf_counter()
                loss = train_step(state, windows, lr, step + 1, [seed, step])
                loss = float(loss)
                rate = tokens / (time.perf_counter() - t0)
                if not math.isfinite(loss):
                    raise UserError(f'the loss became {loss} at step {step + 1}, so training '
                                    f'stopped; the last good checkpoint is {last or "none"}. '
                                    'Lower --learning_rate or set --max_grad_norm')
                step += 1
                losses.append(loss)
                avg = [avg[0] * 0.99 + loss, avg[1] * 0.99 + 1]
                _scalar('loss', loss, step=step)
                _scalar('learning_rate', lr, step=step)
                _scalar('tokens_per_second', rate, step=step)
                bar.update(1)
                bar.set_postfix_str(f'step={step} loss={loss:.3f} avg={avg[0] / avg[1]:.3f} '
                                    f'tok/s={rate:.0f}')
                if save_every and step % save_every == 0:
                    last = saved = save()
                    writer.flush()
                if sample_every and step % sample_every == 0:
                    _samples(hp, state, enc, os.path.join(sample_dir, run_name,
                                                          f'samples-{step}'),
                             num=sample_num, length=sample_length, seed=seed + step)
                if val_batches and step % val_every == 0:
                    val = float(np.mean([eval_step(state.params, b) for b in val_batches]))
                    _scalar('val_loss', val, step=step)
                    bar.write(f'step {step}: validation loss {val:.4f}')
            if losses and saved != os.path.join(run_dir, f'model-{step}'):
                last = save()
            if stop.signal is not None:
                bar.write(f'stopped by signal {stop.signal} at step {step}; saved {last}')
    finally:
        bar.close()
        writer.flush()
    return {'step': step, 'prefix': last, 'losses': losses, 'run_dir': run_dir}


def _samples(hparams, state, enc, path, *, num, length, seed):
    """Unconditional samples from the current weights to samples/RUN/samples-STEP (and the log)."""
    out = sampling.generate(hparams, state.params, nsamples=num, batch_size=num, length=length,
                            seed=seed)
    text = novelty.format_samples([enc.decode(t) for t in out])
    paths.write_text(path, text)
    tqdm.tqdm.write(text)
