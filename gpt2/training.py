"""Training: the loss and its gradients, the trainable state, the compiled train step, and the
loop. Settings come from gpt2/settings.py, optimizers from gpt2/optim.py, the run folder and
resume from gpt2/runs.py."""
import ctypes
import math
import os
import signal
import threading
import time

import numpy as np
import tensorflow as tf
import tqdm
from tensorflow.core.framework import summary_pb2

import encoder as encoder_lib
from gpt2 import checkpoint
from gpt2 import dataset as dataset_lib
from gpt2 import distribute
from gpt2 import fast
from gpt2 import model
from gpt2 import novelty
from gpt2 import optim
from gpt2 import paths
from gpt2 import precision as precision_lib
from gpt2 import runlog
from gpt2 import runs
from gpt2 import sampling
from gpt2.errors import UserError
from gpt2.settings import TrainSettings


# ---------------------------------------------------------------- loss

def loss_and_grads(hparams, params, windows, *, names=None, recompute=False, inputs=None,
                   precision='fp32', loss_scale=None):
    """windows [batch, seq+1] -> (loss, {checkpoint name: gradient}) for the leaves in `names`
    (all by default). The loss predicts windows[:, 1:] from windows[:, :-1] (or from `inputs`,
    the noised copy of windows[:, :-1]). `precision` names the products' type (mixed precision,
    gpt2/precision.py); with `loss_scale` the gradients are taken of loss * loss_scale (fp16's
    loss scaling) and come back scaled so."""
    flat = checkpoint.flatten(params)
    names = sorted(flat) if names is None else names
    with tf.GradientTape() as tape:
        leaves = {k: tf.convert_to_tensor(v) for k, v in flat.items()}
        tape.watch([leaves[k] for k in names])
        tree = precision_lib.compute_copy(checkpoint.unflatten(leaves, hparams), precision)
        x = windows[:, :-1] if inputs is None else inputs
        loss = model.loss(hparams, tree, x, windows[:, 1:],
                          block_fn=fast.recomputed(model.block) if recompute else model.block)
        scaled = loss if loss_scale is None else loss * loss_scale
    grads = tape.gradient(scaled, [leaves[k] for k in names])
    return loss, {k: tf.convert_to_tensor(g) for k, g in zip(names, grads)}


# ---------------------------------------------------------------- state and the step

class TrainState:
    """The trainable state as variables: `params` (the model tree), `slots` ({checkpoint name:
    {slot: variable}} for the trained leaves only) and `names` (the trained leaves)."""

    def __init__(self, hparams, params, optimizer, *, only_transformer=False, consume=False):
        self.hparams = hparams
        self.optimizer = optimizer
        self.rule = optim.get_optimizer(optimizer)
        # With `consume`, each leaf of `params` is dropped from it once its variable holds a
        # copy, so the weights never exist twice (at 1558M, 6.2 GB that would count at the peak).
        self.params = checkpoint.unflatten(
            {k: tf.Variable(v, dtype=tf.float32, trainable=False)
             for k, v in _leaves(params, consume)}, hparams)
        flat = checkpoint.flatten(self.params)
        # nshepperd's --only_train_transformer_layers: the blocks (/h), not wte, wpe or ln_f.
        self.names = sorted(k for k in flat if not only_transformer or k.startswith('model/h'))
        self.slots = {k: {s: tf.Variable(z, trainable=False)
                          for s, z in self.rule.init(tuple(flat[k].shape)).items()}
                      for k in self.names}
        # fp16's dynamic loss scale: the scale, the steps since it last changed, steps skipped
        self.scaler = {'scale': tf.Variable(precision_lib.LOSS_SCALE_START, trainable=False),
                       'good': tf.Variable(0, trainable=False),
                       'skipped': tf.Variable(0, trainable=False)}

    def scaler_state(self):
        return {k: v.numpy().item() for k, v in self.scaler.items()}

    def set_scaler(self, values):
        for k, v in values.items():
            self.scaler[k].assign(v)

    def slot_variables(self):
        """{'slot/<slot>/<name>': variable}, the optimizer state as saved in the sidecar."""
        return {f'slot/{s}/{k}': v for k, d in self.slots.items() for s, v in d.items()}

    def slot_arrays(self):
        """slot_variables() as NumPy arrays (a copy of them all at once)."""
        return {k: v.numpy() for k, v in self.slot_variables().items()}

    def set_slots(self, arrays):
        """Load slot_arrays() output (a dict, or an open .npz read one member at a time); raises
        UserError on missing names or wrong shapes."""
        def mismatch(n, name):
            return UserError(f'optimizer state does not match this run ({n} slots missing or of '
                             f'another shape, e.g. {name}); resume with the same --optimizer and '
                             '--only_train_transformer_layers, or --restore_from fresh')
        want = self.slot_variables()
        missing = [k for k in want if k not in arrays]
        if missing:
            raise mismatch(len(missing), missing[0])
        freed = _Freed()
        for k, v in want.items():
            a = arrays[k]
            if a.shape != tuple(v.shape):
                raise mismatch(1, k)
            v.assign(a)
            freed.add(a)
            del a


def _leaves(params, consume):
    """(checkpoint name, leaf) for each leaf of the tree, dropping each from the tree as it is
    handed out when `consume` is set."""
    flat = checkpoint.flatten(params)
    if not consume:
        yield from sorted(flat.items())
        return
    _clear(params)   # the tree's own references; `flat` holds the only ones left
    freed = _Freed()
    for k in sorted(flat):
        leaf = flat.pop(k)
        yield k, leaf
        freed.add(leaf)
        del leaf


class _Freed:
    """Counts the bytes of NumPy arrays let go and gives them back to the system every 256 MB:
    glibc keeps freed arrays in its heap, and TensorFlow's buffers did not reuse them, so handing
    a model's arrays to variables one by one held them twice at the peak (774M: 6.2 GiB at the
    handover, 4.1 with this; BENCHMARKS.md)."""
    every = 256 << 20

    def __init__(self):
        self.bytes = 0

    def add(self, array):
        self.bytes += getattr(array, 'nbytes', 0)
        if self.bytes >= self.every:
            self.bytes = 0
            try:
                ctypes.CDLL('libc.so.6').malloc_trim(0)
            except (OSError, AttributeError):   # not glibc: nothing to give back this way
                pass


def _clear(tree):
    """Every leaf of the tree (dicts and lists) replaced by None, in place."""
    for k, v in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if isinstance(v, (dict, list)):
            _clear(v)
        else:
            tree[k] = None


def make_train_step(hparams, optimizer='adam', *, weight_decay=0.0, max_grad_norm=None,
                    recompute=False, noise=0.0, precision='fp32', jit_compile=True,
                    strategy=None):
    """A compiled step(state, windows, lr, t, seed) -> loss that updates state in place.

    windows [accumulate, batch, seq+1] int32: gradients are averaged over the leading axis (the
    accumulation micro-batches), so 2 x batch 2 gives what 1 x batch 4 gives. lr (float32) and t
    (the 1-based step, float32) are tensors, so every step reuses one trace; seed [2] int32 seeds
    the token noise statelessly, so a resumed run draws the same noise. `precision` is the
    products' type (gpt2/precision.py); with fp16 the loss is scaled by state.scaler's scale, and
    a step whose gradients overflow changes nothing but the scaler (its 'skipped' count).

    With a tf.distribute `strategy` (gpt2/distribute.py; state made under its scope), `batch` is
    the global batch, each replica takes its slice of it, and the gradients are averaged over
    all of it: the same two halves of the step, gradients() and update(), run on every replica.
    """
    rule = optim.get_optimizer(optimizer)
    scaled = precision_lib.check_precision(precision) == 'fp16'
    apply = _make_apply(rule, weight_decay)

    def gradients(params, names, scale, windows, inputs):
        # -> (loss, [gradient of each leaf in `names`]) averaged over the micro-batches; with
        # fp16 the gradients of loss * scale.
        n = windows.shape[0]
        kw = dict(names=names, recompute=recompute, precision=precision, loss_scale=scale)
        loss, grads = loss_and_grads(hparams, params, windows[0], inputs=inputs[0], **kw)
        grads = [grads[k] for k in names]
        if n > 1:
            for i in tf.range(1, n):
                # Accumulation micro-batches in a loop (not unrolled), so only one micro-batch's
                # activations are alive at a time.
                li, gi = loss_and_grads(hparams, params, windows[i], inputs=inputs[i], **kw)
                loss += li
                grads = [a + gi[k] for a, k in zip(grads, names)]
            loss = loss / n
            grads = [g / n for g in grads]
        return loss, grads

    def update(params, slots, scaler, grads, lr, t):
        # The averaged gradients (of every replica) -> the new weights and slots, in place.
        names = sorted(slots)
        applied = None
        if scaled:
            scale = scaler['scale'].read_value()
            grads = [g / scale for g in grads]
            applied = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            _update_scale(scaler, applied)
        if max_grad_norm:
            grads, _ = tf.clip_by_global_norm(grads, max_grad_norm)
        flat = checkpoint.flatten(params)
        apply({k: flat[k] for k in names}, slots, dict(zip(names, grads)), lr, t, applied,
              {k: optim.decays(k) for k in names})

    if strategy is not None:
        return distribute.make_step(strategy, gradients, update, scaled=scaled,
                                    noised=_make_noised(noise, hparams.n_vocab, jit_compile),
                                    jit_compile=jit_compile)

    @fast.function(jit_compile=jit_compile)
    def step(params, slots, scaler, windows, lr, t, seed):
        names = sorted(slots)
        inputs = _noised(windows[:, :, :-1], seed, noise, hparams.n_vocab)
        scale = scaler['scale'].read_value() if scaled else None
        loss, grads = gradients(params, names, scale, windows, inputs)
        update(params, slots, scaler, grads, lr, t)
        return loss

    def call(state, windows, lr, t, seed):
        return step(state.params, state.slots, state.scaler, tf.constant(windows, tf.int32),
                    tf.constant(lr, tf.float32), tf.constant(t, tf.float32),
                    tf.constant(seed, tf.int32))

    call.tracing_count = step.experimental_get_tracing_count
    call.optimized_hlo = lambda state, windows, stage='optimized_hlo': (
        step.experimental_get_compiler_ir(
            state.params, state.slots, state.scaler, tf.constant(windows, tf.int32),
            tf.constant(1e-4), tf.constant(1.0), tf.constant([0, 0]))(stage=stage))
    return call


def _noised(inputs, seed, noise, n_vocab):
    """nshepperd's --noise: input tokens (never targets) replaced at random by any token, with
    probability `noise`, drawn statelessly from `seed` [2]."""
    if not noise:
        return inputs
    shape = tf.shape(inputs)
    hit = tf.random.stateless_uniform(shape, seed) < noise
    rand = tf.random.stateless_uniform(shape, seed + 1, maxval=n_vocab, dtype=tf.int32)
    return tf.where(hit, rand, inputs)


def _make_noised(noise, n_vocab, jit_compile):
    """_noised as a function of its own, noised(inputs, seed), compiled as the step it feeds is
    (XLA draws other random numbers than TF's kernels), for steps that draw the noise outside."""
    return tf.function(lambda x, seed: _noised(x, seed, noise, n_vocab), jit_compile=jit_compile)


def _make_apply(rule, weight_decay):
    """The optimizer's update as one compiled function, apply(leaves, slots, grads, lr, t,
    applied, decayed) over {name: variable} leaves and their slots: elementwise over every
    weight and slot, so XLA runs it as one pass over memory, also when the products run on TF's
    kernels. `decayed` {name: bool} says which leaves take weight decay; with `applied` (a bool
    tensor, fp16's finite check) an overflowing step leaves the weights and slots as they
    were."""
    @tf.function(jit_compile=True)
    def apply(leaves, slots, grads, lr, t, applied, decayed):
        for k, g in sorted(grads.items()):
            wd = weight_decay if decayed[k] else 0.0
            old = {a: v.read_value() for a, v in slots[k].items()}
            p, s = rule.update(g, leaves[k].read_value(), old, lr, t, wd)
            if applied is not None:
                p = tf.where(applied, p, leaves[k].read_value())
                s = {a: tf.where(applied, v, old[a]) for a, v in s.items()}
            leaves[k].assign(p)
            for a, v in s.items():
                slots[k][a].assign(v)
    return apply


def make_layerwise_step(hparams, optimizer='adam', *, weight_decay=0.0, noise=0.0,
                        precision='fp32', jit_compile=True):
    """A step like make_train_step's (the same call and, to rounding, the same update) that
    never holds the whole model's gradients: the forward pass keeps each block's input only,
    then backprop runs the blocks again from the top one at a time and applies each block's
    update as soon as its gradient exists; wte's (shared by the output layer and the embedding)
    waits for the embedding's part. Beyond the weights and the optimizer's slots, memory holds
    one block's activations, gradients and (mixed precision) compute copy, for a third more
    compute (each block runs twice, as with recompute). Global-norm clipping and fp16's overflow
    check need every gradient before any update, so they have no place here (settings refuse
    them). Each piece is compiled once and serves every block."""
    precision_lib.check_precision(precision)
    assert precision != 'fp16', 'fp16 skips whole steps; the layerwise step cannot'
    rule = optim.get_optimizer(optimizer)
    apply = _make_apply(rule, weight_decay)
    n_head = hparams.n_head

    def top_copy(leaves):  # wte, wpe and ln_f of the tree, wte in the compute type
        return precision_lib.compute_copy(dict(leaves, h=[]), precision)

    @fast.function(jit_compile=jit_compile)
    def forward_block(x, p, mask):
        p = precision_lib.compute_block_copy(p, precision)
        return model.block(x, p, n_head=n_head, mask=mask)[0]

    @fast.function(jit_compile=jit_compile)
    def head(h, top, targets, scale):
        # -> (loss, d(scale * loss)/dh, the same for ln_f's leaves and wte in the output layer)
        leaves = tf.nest.map_structure(tf.convert_to_tensor, top)
        with tf.GradientTape() as tape:
            tape.watch([h] + tf.nest.flatten(leaves))
            loss = model.head_loss(hparams, top_copy(leaves), h, targets)
            scaled = loss * scale
        dh, grads = tape.gradient(scaled, [h, leaves])
        return loss, dh, grads

    @fast.function(jit_compile=jit_compile)
    def embed_grads(top, inputs, dh):
        # -> the gradients for wte (its rows gathered) and wpe given dh for the first block's input
        leaves = tf.nest.map_structure(tf.convert_to_tensor, top)
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(leaves))
            h, _ = model.hidden(hparams, top_copy(leaves), inputs)
        return tf.nest.map_structure(tf.convert_to_tensor,
                                     tape.gradient(h, leaves, output_gradients=dh))

    @fast.function(jit_compile=jit_compile)
    def block_step(xs, dys, p, slots, mask, lr, t, decayed):
        # xs, dys [micro-batches, batch, seq, n_embd]: a block's inputs and the gradients of its
        # outputs -> the gradients of its inputs, its update applied (summed over micro-batches).
        leaves = tf.nest.map_structure(tf.convert_to_tensor, p)

        def grads(x, dy):
            with tf.GradientTape() as tape:
                tape.watch([x] + tf.nest.flatten(leaves))
                y = model.block(x, precision_lib.compute_block_copy(leaves, precision),
                                n_head=n_head, mask=mask)[0]
            return tape.gradient(y, [x, leaves], output_gradients=dy)

        dx, g = grads(xs[0], dys[0])
        dxs = [dx]
        for j in range(1, xs.shape[0]):
            with tf.control_dependencies(tf.nest.flatten(g)):  # one micro-batch at a time
                x = tf.identity(xs[j])
            dx, gj = grads(x, dys[j])
            dxs.append(dx)
            g = tf.nest.map_structure(tf.add, g, gj)
        apply(checkpoint.flatten(p), slots, checkpoint.flatten(g), lr, t, None, decayed)
        return tf.stack(dxs)

    noised = _make_noised(noise, hparams.n_vocab, jit_compile)

    def call(state, windows, lr, t, seed):
        windows = tf.constant(windows, tf.int32)
        n = windows.shape[0]
        inputs = noised(windows[:, :, :-1], tf.constant(seed, tf.int32))
        lr, t = tf.constant(lr, tf.float32), tf.constant(t, tf.float32)
        params = state.params
        top = {k: params[k] for k in ('wte', 'wpe', 'ln_f')}
        trained = set(state.slots)
        # The forward pass, one compiled block at a time, keeping each block's input.
        ins, masks = [], []   # (every block's mask is the same causal one)

        def keep(x, p, *, mask, **_):
            ins[-1].append(x)
            masks[:] = [mask]
            return forward_block(x, p, mask), None
        outs = []
        for j in range(n):
            ins.append([])
            h, _ = model.hidden(hparams, dict(top_copy(top), h=params['h']), inputs[j],
                                block_fn=keep)
            outs.append(h)
        loss, dys, g_top = 0.0, [], None
        for j in range(n):
            lj, dh, gj = head(outs[j], {'ln_f': top['ln_f'], 'wte': top['wte']},
                              windows[j, :, 1:], tf.constant(1 / n))
            loss, g_top = loss + lj, gj if g_top is None else tf.nest.map_structure(
                tf.add, g_top, gj)
            dys.append(dh)
        del outs
        # Backprop from the top block down, each block's update applied once it has its gradient.
        for i in reversed(range(hparams.n_layer)):
            p = params['h'][i]
            # Keyed by the names within a block ('model/ln_1/g'), so one trace serves them all.
            full = {k: k.replace('model/', f'model/h{i}/', 1) for k in checkpoint.flatten(p)}
            slots = {k: state.slots[v] for k, v in full.items()}
            decayed = {k: optim.decays(v) for k, v in full.items()}
            xs = tf.stack([ins[j][i] for j in range(n)])
            for j in range(n):
                ins[j][i] = None
            dys = tf.unstack(block_step(xs, tf.stack(dys), p, slots, masks[0], lr, t, decayed))
        if trained & {'model/wte', 'model/wpe', 'model/ln_f/g', 'model/ln_f/b'}:
            grads = {'model/ln_f/g': g_top['ln_f']['g'], 'model/ln_f/b': g_top['ln_f']['b'],
                     'model/wte': g_top['wte']}
            for j in range(n):
                ge = embed_grads({'wte': top['wte'], 'wpe': top['wpe']}, inputs[j], dys[j])
                grads['model/wte'] = grads['model/wte'] + ge['wte']
                grads['model/wpe'] = ge['wpe'] if j == 0 else grads['model/wpe'] + ge['wpe']
            flat = checkpoint.flatten(params)
            apply({k: flat[k] for k in grads}, {k: state.slots[k] for k in grads}, grads, lr, t,
                  None, {k: optim.decays(k) for k in grads})
        return loss / n

    pieces = (forward_block, head, embed_grads, block_step)
    call.tracing_count = lambda: sum(f.experimental_get_tracing_count() for f in pieces)
    return call


def _update_scale(scaler, finite):
    """fp16's dynamic loss scale after a step: halved (and the step counted as skipped) when its
    gradients overflowed, doubled after LOSS_SCALE_GROWTH_STEPS finite steps in a row."""
    good = tf.where(finite, scaler['good'] + 1, 0)
    grow = good >= precision_lib.LOSS_SCALE_GROWTH_STEPS
    scaler['scale'].assign(tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5) * scaler['scale'])
    scaler['good'].assign(tf.where(grow, 0, good))
    scaler['skipped'].assign_add(tf.where(finite, 0, 1))


def make_eval_step(hparams, *, jit_compile=True):
    """A compiled loss(params, windows [batch, seq+1]) -> mean next-token cross-entropy."""
    @fast.function(jit_compile=jit_compile)
    def step(params, windows):
        # Gradients are not taken here, so the plain loss, not the fused twin that works them out.
        h, _ = model.hidden(hparams, params, windows[:, :-1])
        h = tf.reshape(model.norm(h, params['ln_f']), [-1, hparams.n_embd])
        return model.cross_entropy.plain(h, params['wte'], tf.reshape(windows[:, 1:], [-1]))
    return lambda params, windows: step(params, tf.constant(windows, tf.int32))


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


def train(dataset=None, **flags):
    """Train with settings.TrainSettings made from `flags` (train.py's flags); see run()."""
    return run(TrainSettings.from_flags(dataset=dataset, **flags))


def run(s):
    """Train with settings `s` until step s.total_steps (the global step, so a resumed run stops
    at the same place), the end of the curriculum, or Ctrl-C/SIGTERM (the step in flight finishes
    and is saved). Returns {'step', 'prefix' (the last checkpoint), 'losses' (this call's),
    'run_dir'}.

    Under --strategy (gpt2/distribute.py) every worker runs this loop on the same data; only the
    chief writes the run folder, samples and events, and all stop after the same step."""
    strategy = distribute.make_strategy(s.strategy, s.tpu)  # before TensorFlow runs anything
    distribute.check_batch(strategy, s.batch_size, s.strategy)
    chief = distribute.is_chief(strategy)
    run_dir = runs.folder(s)
    hp, params, prefix, vocab_dir = runs.start(s)
    seq = hp.n_ctx if s.seq_len is None else s.seq_len
    if not 1 <= seq <= hp.n_ctx:
        raise UserError(f'--seq_len must be in 1..n_ctx ({hp.n_ctx}), got {seq!r}')
    if os.path.isfile(os.path.join(run_dir, runs.VOCAB_FILES[0])):
        vocab_dir = run_dir
    enc = encoder_lib.get_encoder(None if vocab_dir == runs.ENCODER_DIR else vocab_dir)
    plan, order, total = s.plan, s.order, s.total_steps
    samplers = [dataset_lib.Sampler(dataset_lib.load_chunks(p, enc, combine=s.combine), seq + 1,
                                    seed=s.seed + i) for i, (p, _) in enumerate(plan)]
    val_batches = []
    if s.val_dataset and s.val_every:
        val_batches = dataset_lib.validation_batches(
            dataset_lib.load_chunks(s.val_dataset, enc, combine=s.combine), seq + 1,
            s.val_batch_size, s.val_batch_count)
    if chief:
        runs.prepare(s, hp, vocab_dir)

    with distribute.scope(strategy):
        state = TrainState(hp, params, s.optimizer,
                           only_transformer=s.only_train_transformer_layers, consume=True)
    del params
    step, avg = runs.resume(s, state, samplers, prefix)
    distribute.check_same_start(strategy, step)
    skipped = state.scaler_state()['skipped']

    def save():
        if not chief:   # the chief writes what every worker holds
            return os.path.join(run_dir, f'model-{step}')
        log.sync()  # a checkpoint never exists without the log lines that led to it
        return runs.save(state, os.path.join(run_dir, f'model-{step}'),
                         runs.meta(s, step, samplers, avg, hp, state), keep=s.max_checkpoints,
                         keep_optimizer_state=s.keep_optimizer_state)

    if s.layerwise:
        train_step = make_layerwise_step(hp, s.optimizer, weight_decay=s.weight_decay,
                                         noise=s.noise, precision=s.precision,
                                         jit_compile=s.jit_compile)
    else:
        train_step = make_train_step(hp, s.optimizer, weight_decay=s.weight_decay,
                                     max_grad_norm=s.max_grad_norm,
                                     recompute=s.memory_saving_gradients, noise=s.noise,
                                     precision=s.precision, jit_compile=s.jit_compile,
                                     strategy=strategy)
    eval_step = make_eval_step(hp, jit_compile=s.jit_compile) if val_batches else None
    writer = tf.summary.create_file_writer(run_dir) if chief else tf.summary.create_noop_writer()
    losses, saved, last = [], None, prefix
    tokens = s.batch_size * s.accumulate_gradients * seq
    bar = tqdm.tqdm(total=total, initial=step, disable=not s.progress, dynamic_ncols=True,
                    unit='step')
    log = runlog.Log(run_dir, step) if chief else runlog.Nowhere()
    try:
        with _Stop() as stop, writer.as_default():
            while (total is None or step < total) and not distribute.agree_to_stop(
                    strategy, stop.signal is not None):
                windows = samplers[order.index(step)].batch(
                    s.batch_size * s.accumulate_gradients).reshape(
                    s.accumulate_gradients, s.batch_size, seq + 1)
                lr = s.learning_rate_at(step)
                t0 = time.perf_counter()
                loss = float(train_step(state, windows, lr, step + 1, [s.seed, step]))
                rate = tokens / (time.perf_counter() - t0)
                scaler = state.scaler_state() if s.precision == 'fp16' else None
                if scaler and scaler['skipped'] > skipped:   # the gradients overflowed
                    skipped = scaler['skipped']
                    if scaler['scale'] < 1:
                        raise UserError(f'fp16 gradients overflowed at every loss scale down to '
                                        f'{scaler["scale"]:g} (step {step + 1}); train with '
                                        '--precision bf16 or fp32')
                elif not math.isfinite(loss):
                    raise UserError(f'the loss became {loss} at step {step + 1}, so training '
                                    f'stopped; the last good checkpoint is {last or "none"}. '
                                    'Lower --learning_rate or set --max_grad_norm')
                step += 1
                losses.append(loss)
                avg = [avg[0] * 0.99 + loss, avg[1] * 0.99 + 1]
                _scalar('loss', loss, step=step)
                _scalar('learning_rate', lr, step=step)
                _scalar('tokens_per_second', rate, step=step)
                note = ''
                if scaler:
                    _scalar('loss_scale', scaler['scale'], step=step)
                    _scalar('skipped_steps', skipped, step=step)
                    note = f' skipped={skipped}'
                bar.update(1)
                bar.set_postfix_str(f'step={step} loss={loss:.3f} avg={avg[0] / avg[1]:.3f} '
                                    f'tok/s={rate:.0f}{note}')
                record = {'step': step, 'loss': loss, 'learning_rate': lr,
                          'tokens_per_second': rate}
                if scaler:
                    record.update(loss_scale=scaler['scale'], skipped_steps=skipped)
                if val_batches and step % s.val_every == 0:
                    val = float(np.mean([eval_step(state.params, b) for b in val_batches]))
                    _scalar('val_loss', val, step=step)
                    bar.write(f'step {step}: validation loss {val:.4f}')
                    record['val_loss'] = val
                log.write(record)
                if s.save_every and step % s.save_every == 0:
                    last = saved = save()
                    writer.flush()
                if chief and s.sample_every and step % s.sample_every == 0:
                    _samples(hp, state, enc, os.path.join(s.sample_dir, s.run_name,
                                                          f'samples-{step}'),
                             num=s.sample_num, length=s.sample_length, seed=s.seed + step)
            if losses and saved != os.path.join(run_dir, f'model-{step}'):
                last = save()
            if stop.signal is not None:
                bar.write(f'stopped by signal {stop.signal} at step {step}; saved {last}')
    except distribute.PEER_FAILURES as e:
        if not distribute.is_multi_worker(strategy):
            raise
        raise UserError(f'{distribute.dead_peer(strategy, e)} at step {step + 1}, so training '
                        f'stopped; the last checkpoint is {last or "none"}') from None
    finally:
        bar.close()
        writer.flush()
        log.close()
    return {'step': step, 'prefix': last, 'losses': losses, 'run_dir': run_dir}


def _samples(hparams, state, enc, path, *, num, length, seed):
    """Unconditional samples from the current weights to samples/RUN/samples-STEP (and the log)."""
    out = sampling.generate(hparams, state.params, nsamples=num, batch_size=num, length=length,
                            seed=seed)
    text = novelty.format_samples([enc.decode(t) for t in out])
    paths.write_text(path, text)
    tqdm.tqdm.write(text)
