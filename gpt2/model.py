"""GPT-2's forward pass: pure functions over a parameter tree keyed like OpenAI's checkpoint.

The tree is {'wte', 'wpe', 'h': [block, ...], 'ln_f'} with each block {'ln_1', 'attn': {'c_attn',
'c_proj'}, 'ln_2', 'mlp': {'c_fc', 'c_proj'}}; leaves have the checkpoint's shapes (conv1d weights
keep OpenAI's leading axis of 1). Leaves may be arrays, tensors or variables; nothing here makes state.
for_decoding gives the tree with each conv1d weight stored transposed, which sampling reads faster.
"""
import math

import numpy as np
import tensorflow as tf

# XLA's in-place update and the check for an XLA context have no public API in TF 2.
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util


def init_params(hparams, seed=0, dtype=np.float32):
    """A fresh tree with OpenAI's initialisers: N(0, 0.02) weights, N(0, 0.01) wpe, zero biases."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)

    def norm(n):
        return {'g': np.ones([n], dtype), 'b': np.zeros([n], dtype)}

    def conv1d(nx, nf):
        return {'w': normal([1, nx, nf], 0.02), 'b': np.zeros([nf], dtype)}

    d = hparams.n_embd
    return {
        'wte': normal([hparams.n_vocab, d], 0.02),
        'wpe': normal([hparams.n_ctx, d], 0.01),
        'h': [{
            'ln_1': norm(d),
            'attn': {'c_attn': conv1d(d, 3 * d), 'c_proj': conv1d(d, d)},
            'ln_2': norm(d),
            'mlp': {'c_fc': conv1d(d, 4 * d), 'c_proj': conv1d(4 * d, d)},
        } for _ in range(hparams.n_layer)],
        'ln_f': norm(d),
    }


def to_tensors(params):
    """The same tree with NumPy leaves made constant tensors once (so compiled steps are not handed
    arrays to convert on every call); tensors and variables pass through, variables stay live."""
    return tf.nest.map_structure(
        lambda x: x if isinstance(x, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(x), params)


def for_decoding(params):
    """The tree as tensors with each conv1d {'w' [1, nx, nf], 'b'} stored as {'w_t' [nf, nx], 'b'}:
    what sampling passes to forward (see linear). A copy for reading, not a checkpoint layout; a
    tree already in this layout comes back as it is."""
    def conv1d(p):
        if 'w_t' in p:
            return p
        return {'w_t': tf.transpose(tf.convert_to_tensor(p['w'])[0]), 'b': p['b']}

    return to_tensors(dict(params, h=[
        dict(p, attn={k: conv1d(v) for k, v in p['attn'].items()},
             mlp={k: conv1d(v) for k, v in p['mlp'].items()}) for p in params['h']]))


ATTN_BLOCK = 128  # queries per block in attention without a cache (see attn)
FEW_ROWS = 128    # up to this many rows, products are taken weights-first (see _few_rows_matmul)
_GELU_C = math.sqrt(2 / math.pi)


@tf.custom_gradient
def gelu(x):
    """OpenAI's tanh approximation, not the erf form: the weights were trained with this one.

    Its gradient keeps only x for backprop and recomputes the tanh there, so training holds one
    [..., 4 * n_embd] tensor per block for it instead of three."""
    y = 0.5 * x * (1 + tf.tanh(_GELU_C * (x + 0.044715 * tf.pow(x, 3))))

    def grad(dy):
        # Under XLA, a barrier keeps the tanh below from being merged with the forward one
        # (which would keep that alive after all).
        z = xla.optimization_barrier(x, dy)[0] if in_xla() else x
        t = tf.tanh(_GELU_C * (z + 0.044715 * tf.pow(z, 3)))
        return dy * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z))
    return y, grad


def norm(x, p, *, eps=1e-5):
    """[..., n_embd] -> [..., n_embd]: layer norm with OpenAI's epsilon."""
    @tf.custom_gradient
    def f(x, g, b):
        u = tf.reduce_mean(x, axis=-1, keepdims=True)
        r = tf.math.rsqrt(tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True) + eps)

        def grad(dy):
            # The layer-norm backward written out. From TF's own gradient of the lines above,
            # XLA fused the residual stream's gradient into every layer's copy of it and
            # recomputed the sum over all the layers above there (~4% of a 124M training step).
            xhat = (x - u) * r
            dxhat = dy * g
            dx = (dxhat - tf.reduce_mean(dxhat, axis=-1, keepdims=True) -
                  xhat * tf.reduce_mean(dxhat * xhat, axis=-1, keepdims=True)) * r
            rows = list(range(len(x.shape) - 1))
            return dx, tf.reduce_sum(dy * xhat, rows), tf.reduce_sum(dy, rows)
        return (x - u) * r * g + b, grad
    return f(x, p['g'], p['b'])


def linear(x, p):
    """[..., nx] -> [..., nf]: OpenAI's conv1d, a matmul with w of shape [1, nx, nf], or with the
    transposed w_t [nf, nx] of a for_decoding tree."""
    if 'w_t' in p:
        nf, nx = p['w_t'].shape
        x2 = tf.reshape(x, [-1, nx])
        if _few(x2):
            y = tf.transpose(_few_rows_matmul(p['w_t'], x2) + p['b'][:, None])
        else:
            y = tf.matmul(x2, p['w_t'], transpose_b=True) + p['b']
    else:
        nx, nf = p['w'].shape[-2], p['w'].shape[-1]
        y = tf.matmul(tf.reshape(x, [-1, nx]), tf.reshape(p['w'], [nx, nf])) + p['b']
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [nf]], 0))


def _few(x2):
    # A statically short [rows, n] input under XLA (a decode step, a short prompt).
    return x2.shape[0] is not None and x2.shape[0] <= FEW_ROWS and in_xla()


def _few_rows_matmul(w_t, x2):
    """w_t [n, k], x2 [rows, k] -> [n, rows]: w_t x2^T, for few rows under XLA.

    XLA's CPU matmul reads a [n, k] weight about 1.3x (1 row) to 1.5x (8 rows) faster as the left
    operand against the rows transposed than as x2 @ w (bench/decode.py), but folds a transpose
    of the result back into the slower form: the barrier keeps the product as written."""
    return xla.optimization_barrier(tf.matmul(w_t, x2, transpose_b=True))[0]


def _split_heads(x, n_head):
    # [batch, seq, n_embd] -> [batch, n_head, seq, head_dim]
    b, s = tf.shape(x)[0], tf.shape(x)[1]
    return tf.transpose(tf.reshape(x, [b, s, n_head, x.shape[-1] // n_head]), [0, 2, 1, 3])


def _merge_heads(x):
    # [batch, n_head, seq, head_dim] -> [batch, seq, n_embd]
    b, s = tf.shape(x)[0], tf.shape(x)[2]
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b, s, x.shape[1] * x.shape[3]])


def _masked(w, mask):
    # Where-masking rather than OpenAI's `w*b - 1e10*(1-b)`: same softmax, and no overflow in fp16.
    return tf.where(mask, w, tf.constant(w.dtype.min, w.dtype))


def attn(x, p, *, n_head, mask, past=None, pos=0):
    """[batch, seq, n_embd] -> ([batch, seq, n_embd], keys/values [2, batch, n_head, *, head_dim]).

    Without `past` the queries attend to the new keys under `mask` [batch, 1, seq, seq] and the
    second result is OpenAI's `present` (the new keys and values). With `past`, this layer's
    fixed-size buffer [2, batch, n_head, length, head_dim], the new keys and values are written into
    it at slots pos..pos+seq-1 first, the queries attend over the whole buffer under `mask`
    [batch, 1, seq, length], and the second result is the updated buffer.
    """
    q, k, v = [_split_heads(t, n_head) for t in tf.split(linear(x, p['c_attn']), 3, axis=2)]
    present = tf.stack([k, v])
    if past is not None:
        present = write_cache(past, present, pos)
        k, v = present[0], present[1]
    scale = tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype))
    if q.shape[2] == 1:
        # One query per row (a decode step): a broadcast product and a sum, which XLA streams
        # through in one pass, instead of batch x n_head matmuls with one row each.
        w = tf.nn.softmax(_masked(tf.reduce_sum(q * k, axis=-1)[:, :, None] * scale, mask))
        a = tf.reduce_sum(tf.transpose(w, [0, 1, 3, 2]) * v, axis=2, keepdims=True)
    elif past is None and q.shape[2] is not None and q.shape[2] >= 2 * ATTN_BLOCK:
        # Without a cache attention is causal: a block of queries needs the keys up to its own
        # end only, so skipping the rest saves nearly half the work (and the saved weights).
        a = tf.concat([_attend(q[:, :, i:i + ATTN_BLOCK], k[:, :, :i + ATTN_BLOCK],
                               v[:, :, :i + ATTN_BLOCK],
                               mask[..., i:i + ATTN_BLOCK, :i + ATTN_BLOCK], scale)
                       for i in range(0, q.shape[2], ATTN_BLOCK)], axis=2)
    else:
        a = _attend(q, k, v, mask, scale)
    return linear(_merge_heads(a), p['c_proj']), present


def _attend(q, k, v, mask, scale):
    # softmax(q k^T / sqrt(head_dim), masked) v over [batch, n_head, queries | keys, head_dim]
    return tf.matmul(tf.nn.softmax(_masked(tf.matmul(q, k, transpose_b=True) * scale, mask)), v)


def mlp(x, p):
    """[..., n_embd] -> [..., n_embd]"""
    return linear(gelu(linear(x, p['c_fc'])), p['c_proj'])


def block(x, p, *, n_head, mask, past=None, pos=0):
    """One pre-norm transformer block; returns the new x and this layer's keys and values (see
    attn)."""
    a, present = attn(norm(x, p['ln_1']), p['attn'], n_head=n_head, mask=mask, past=past, pos=pos)
    x = x + a
    return x + mlp(norm(x, p['ln_2']), p['mlp']), present


def empty_cache(hparams, batch, length=None, dtype=tf.float32):
    """A zeroed key/value buffer per layer: a tuple of n_layer [2, batch, n_head, length, head_dim]
    (OpenAI's `present` shape, length <= n_ctx).

    Its size is fixed, so a decode step compiles once; give `length` as the tokens a run needs
    (prompt + new) to read and write less than a full n_ctx buffer. One buffer per layer, so XLA
    updates each in place without copying the others.
    """
    length = hparams.n_ctx if length is None else length
    shape = [2, batch, hparams.n_head, length, hparams.head_dim]
    return tuple(tf.zeros(shape, dtype) for _ in range(hparams.n_layer))


def in_xla():
    """True while tracing code that XLA will compile (jit_compile=True), where XLA-only ops work."""
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def write_cache(buffer, present, pos):
    """A layer's buffer [2, batch, n_head, length, head_dim] with `present` (seq long) put at
    `pos`."""
    if in_xla():
        # Under XLA this is an in-place update of a loop-carried buffer.
        zero = tf.zeros([], tf.int32)
        return xla.dynamic_update_slice(buffer, present,
                                        [zero] * 3 + [tf.cast(pos, tf.int32), zero])
    seq = tf.shape(present)[3]
    out = tf.concat([buffer[:, :, :, :pos], present, buffer[:, :, :, pos + seq:]], axis=3)
    return tf.ensure_shape(out, buffer.shape)


def embed(params, tokens, positions):
    """tokens, positions [batch, seq] -> [batch, seq, n_embd]: token plus position embeddings."""
    return tf.gather(params['wte'], tokens) + tf.gather(params['wpe'], positions)


def head(hparams, params, h):
    """[batch, seq, n_embd] -> logits [batch, seq, n_vocab]: final norm, then the matmul with wte
    (the output layer is tied to the token embedding)."""
    shape = tf.shape(h)
    h = tf.reshape(norm(h, params['ln_f']), [-1, hparams.n_embd])
    if _few(h):
        logits = tf.transpose(_few_rows_matmul(params['wte'], h))
    else:
        logits = tf.matmul(h, params['wte'], transpose_b=True)
    return tf.reshape(logits, tf.concat([shape[:-1], [hparams.n_vocab]], 0))


def forward(hparams, params, tokens, *, cache=None, pos=0, start=None):
    """tokens [batch, seq] -> (logits [batch, seq, n_vocab], cache).

    Without a cache this is OpenAI's model() over the whole sequence, and the returned cache is None.
    With a cache (a buffer per layer, see empty_cache) the tokens occupy slots pos..pos+seq-1: they
    attend to slots before `pos` and causally to each other, and the returned cache has their keys
    and values written in. `start` [batch] (optional) marks each row's first real slot: slots
    before it are left padding, invisible to attention, and positions count from it, so prompts of
    different lengths can share one batch (right-aligned) and give what each would alone.
    """
    tokens = tf.convert_to_tensor(tokens)
    seq = tf.shape(tokens)[1]
    pos = tf.cast(pos, tf.int32)
    slots = pos + tf.range(seq)                                   # [seq]
    offset = tf.zeros([tf.shape(tokens)[0]], tf.int32) if start is None else tf.cast(start, tf.int32)
    positions = tf.maximum(slots[None, :] - offset[:, None], 0)   # [batch, seq]
    h = embed(params, tokens, positions)

    if cache is None:
        keys = slots                                              # attend to the new tokens
    else:
        keys = tf.range(cache[0].shape[-2])                       # attend over the whole buffer
    # A query sees the keys at or before its slot, from its row's first real slot on.
    mask = ((keys[None, None, :] <= slots[None, :, None]) &
            (keys[None, None, :] >= offset[:, None, None]))[:, None]   # [batch, 1, seq, keys]

    presents = []
    for i, p in enumerate(params['h']):
        h, present = block(h, p, n_head=hparams.n_head, mask=mask,
                           past=None if cache is None else cache[i], pos=pos)
        presents.append(present)
    return head(hparams, params, h), None if cache is None else tuple(presents)


def make_forward(hparams, *, jit_compile=None):
    """forward compiled once per input shape for these hparams.

    `params` stays an argument, so another tree of the same shapes (another checkpoint) reuses the
    trace; `pos` is passed as a tensor, so every position does too. `.tracing_count()` reports traces.
    """
    @tf.function(jit_compile=jit_compile)
    def step(params, tokens, cache, pos, start):
        return forward(hparams, params, tokens, cache=cache, pos=pos, start=start)

    def call(params, tokens, cache=None, pos=0, start=None):
        return step(params, tokens, cache, tf.constant(pos, tf.int32), start)

    call.tracing_count = step.experimental_get_tracing_count
    return call
