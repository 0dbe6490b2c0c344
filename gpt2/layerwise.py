"""The block-at-a-time train step (--layerwise): backprop one block at a time, each block's update
applied as soon as its gradient exists, so the whole model's gradients never exist at once."""
from typing import NamedTuple

import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import fast
from gpt2 import model
from gpt2 import optim
from gpt2 import precision as precision_lib
from gpt2 import step as step_lib


def make_layerwise_step(hparams, optimizer='adam', *, weight_decay=0.0, noise=0.0,
                        precision='fp32', jit_compile=True):
    """A step like step.make_train_step's (the same call and, to rounding, the same update) that
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
    apply = step_lib.make_apply(rule, weight_decay)
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

    noised = step_lib.make_noised(noise, hparams.n_vocab, jit_compile)
    pieces = _Pieces(top_copy, forward_block, head, embed_grads, block_step, apply)

    def call(state, windows, lr, t, seed):
        windows = tf.constant(windows, tf.int32)
        n = windows.shape[0]
        inputs = noised(windows[:, :, :-1], tf.constant(seed, tf.int32))
        lr, t = tf.constant(lr, tf.float32), tf.constant(t, tf.float32)
        ins, mask, outs = _forward(hparams, pieces, state.params, inputs)
        loss, dys, g_top = _head(pieces, state.params, outs, windows)
        del outs
        dys = _backprop_blocks(hparams, pieces, state, ins, dys, mask, lr, t)
        _update_top(pieces, state, g_top, inputs, dys, lr, t)
        return loss / n

    compiled = (forward_block, head, embed_grads, block_step)
    call.tracing_count = lambda: sum(f.experimental_get_tracing_count() for f in compiled)
    return call


class _Pieces(NamedTuple):
    """make_layerwise_step's compiled pieces (and the compute copy of the top leaves)."""
    top_copy: object
    forward_block: object
    head: object
    embed_grads: object
    block_step: object
    apply: object


def _forward(hparams, pieces, params, inputs):
    """The forward pass of each micro-batch, one compiled block at a time -> (each micro-batch's
    list of every block's input, the causal mask every block shares, the last block's outputs)."""
    top = {k: params[k] for k in ('wte', 'wpe', 'ln_f')}
    ins, masks = [], []

    def keep(x, p, *, mask, **_):
        ins[-1].append(x)
        masks[:] = [mask]
        return pieces.forward_block(x, p, mask), None
    outs = []
    for j in range(inputs.shape[0]):
        ins.append([])
        h, _ = model.hidden(hparams, dict(pieces.top_copy(top), h=params['h']), inputs[j],
                            block_fn=keep)
        outs.append(h)
    return ins, masks[0], outs


def _head(pieces, params, outs, windows):
    """The output layer and loss of each micro-batch -> (the summed loss, each micro-batch's
    gradient for the last block's output, ln_f's and the output layer's wte gradients summed)."""
    n = len(outs)
    loss, dys, g_top = 0.0, [], None
    for j, h in enumerate(outs):
        lj, dh, gj = pieces.head(h, {'ln_f': params['ln_f'], 'wte': params['wte']},
                                 windows[j, :, 1:], tf.constant(1 / n))
        loss, g_top = loss + lj, gj if g_top is None else tf.nest.map_structure(tf.add, g_top, gj)
        dys.append(dh)
    return loss, dys, g_top


def _backprop_blocks(hparams, pieces, state, ins, dys, mask, lr, t):
    """Backprop from the top block down, each block's update applied once it has its gradient
    and its inputs let go -> the gradients of the first block's inputs, per micro-batch."""
    n = len(ins)
    for i in reversed(range(hparams.n_layer)):
        p = state.params['h'][i]
        # Keyed by the names within a block ('model/ln_1/g'), so one trace serves them all.
        full = {k: k.replace('model/', f'model/h{i}/', 1) for k in checkpoint.flatten(p)}
        slots = {k: state.slots[v] for k, v in full.items()}
        decayed = {k: optim.decays(v) for k, v in full.items()}
        xs = tf.stack([ins[j][i] for j in range(n)])
        for j in range(n):
            ins[j][i] = None
        dys = tf.unstack(pieces.block_step(xs, tf.stack(dys), p, slots, mask, lr, t, decayed))
    return dys


def _update_top(pieces, state, g_top, inputs, dys, lr, t):
    """The update of ln_f, wpe and wte (the output layer's part and the embedding's, summed),
    when they are trained."""
    if not set(state.slots) & {'model/wte', 'model/wpe', 'model/ln_f/g', 'model/ln_f/b'}:
        return
    params = state.params
    grads = {'model/ln_f/g': g_top['ln_f']['g'], 'model/ln_f/b': g_top['ln_f']['b'],
             'model/wte': g_top['wte']}
    for j in range(inputs.shape[0]):
        ge = pieces.embed_grads({'wte': params['wte'], 'wpe': params['wpe']}, inputs[j], dys[j])
        grads['model/wte'] = grads['model/wte'] + ge['wte']
        grads['model/wpe'] = ge['wpe'] if j == 0 else grads['model/wpe'] + ge['wpe']
    flat = checkpoint.flatten(params)
    pieces.apply({k: flat[k] for k in grads}, {k: state.slots[k] for k in grads}, grads, lr, t,
                 None, {k: optim.decays(k) for k in grads})
