"""One compiled training step and what it works on: the loss and its gradients, the trainable
state (weights and optimizer slots as variables), the whole-model step (token noise, fp16's loss
scale) and the eval step. The loop is gpt2/training.py's; a block at a time, gpt2/layerwise.py."""
import ctypes

import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import distribute
from gpt2 import fast
from gpt2 import model
from gpt2 import optim
from gpt2 import precision as precision_lib
from gpt2.errors import UserError


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
    a model's arrays to variables one by one held them twice at the peak (BENCHMARKS.md, the
    seventh session's memory figures)."""
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
    apply = make_apply(rule, weight_decay)

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
                                    noised=make_noised(noise, hparams.n_vocab, jit_compile),
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


def make_noised(noise, n_vocab, jit_compile):
    """_noised as a function of its own, noised(inputs, seed), compiled as the step it feeds is
    (XLA draws other random numbers than TF's kernels), for steps that draw the noise outside."""
    return tf.function(lambda x, seed: _noised(x, seed, noise, n_vocab), jit_compile=jit_compile)


def make_apply(rule, weight_decay):
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


def _update_scale(scaler, finite):
    """fp16's dynamic loss scale after a step: halved (and the step counted as skipped) when its
    gradients overflowed, doubled after LOSS_SCALE_GROWTH_STEPS finite steps in a row."""
    good = tf.where(finite, scaler['good'] + 1, 0)
    grow = good >= precision_lib.LOSS_SCALE_GROWTH_STEPS
    scaler['scale'].assign(tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5) * scaler['scale'])
    scaler['good'].assign(tf.where(grow, 0, good))
    scaler['skipped'].assign_add(tf.where(finite, 0, 1))


# ---------------------------------------------------------------- the eval step

def make_eval_step(hparams, *, jit_compile=True):
    """A compiled loss(params, windows [batch, seq+1]) -> mean next-token cross-entropy."""
    @fast.function(jit_compile=jit_compile)
    def step(params, windows):
        # Gradients are not taken here, so the plain loss, not the fused twin that works them out.
        h, _ = model.hidden(hparams, params, windows[:, :-1])
        h = tf.reshape(model.norm(h, params['ln_f']), [-1, hparams.n_embd])
        return model.cross_entropy.plain(h, params['wte'], tf.reshape(windows[:, 1:], [-1]))
    return lambda params, windows: step(params, tf.constant(windows, tf.int32))

