"""The block-at-a-time train step (--layerwise): backprop one block at a time, each block's update
applied as soon as its gradient exists, so the whole model's gradients never exist at once."""
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
