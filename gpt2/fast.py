"""Speed beside the math: each function here computes what its plain twin in gpt2/model.py (or, for
the sampling filters, gpt2/sampling.py) computes, named in its docstring, faster or in less memory
on some device or shape; BENCHMARKS.md holds their measurements. `plain()` (or GPT2_PLAIN=1) runs
the plain math everywhere instead.

The only module that imports private TensorFlow APIs (XLA's in-place update and optimization
barrier, and the check for an XLA context, have no public API in TF 2).
"""
import contextlib
import functools
import math
import os

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

from gpt2 import precision

ATTN_BLOCK = 128  # queries per block in causal attention without a cache (see attend)
FEW_ROWS = 128    # up to this many rows, products are taken weights-first (see _few_rows_matmul)
LOSS_ROWS = 512   # rows of logits the fused output layer and loss hold at once (103 MB at 124M)

PLAIN = os.environ.get('GPT2_PLAIN', '') not in ('', '0')  # the switch; see function()
TWINNED = []   # every plain function bound to a twin by beside()


@contextlib.contextmanager
def plain(on=True):
    """Within this block, steps and decoders built (and functions run eagerly) use the plain
    math."""
    global PLAIN
    before, PLAIN = PLAIN, on
    try:
        yield
    finally:
        PLAIN = before


def beside(twin):
    """@beside(fast.norm) on a plain function binds its fast twin here to it: calls go to the
    twin, handed the plain function first, unless the plain switch is on. Bound by object, so a
    renamed twin fails at import, and each twin serves one plain function."""
    assert not getattr(twin, 'bound', False), f'{twin.__name__} is already some function\'s twin'
    twin.bound = True

    def bind(plain_fn):
        @functools.wraps(plain_fn)
        def call(*args, **kwargs):
            if PLAIN:
                return plain_fn(*args, **kwargs)
            return call.twin(plain_fn, *args, **kwargs)
        call.plain, call.twin = plain_fn, twin
        TWINNED.append(call)
        return call
    return bind


def function(fn=None, *, jit_compile=None):
    """tf.function(fn, jit_compile=...) whose every trace sees the plain switch as it was when
    this was called (when the step or decoder was built), whenever the trace happens; factories
    that cache what they build key it with PLAIN (built), so plain() never meets a stale trace."""
    on = PLAIN

    def build(fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with plain(on):
                return fn(*args, **kwargs)
        return tf.function(traced, jit_compile=jit_compile)
    return build if fn is None else build(fn)


def built(maxsize):
    """functools.lru_cache for a factory of compiled functions (fast.function), keyed by the plain
    switch as well as by the factory's arguments: what plain() asks for is built under it."""
    def wrap(factory):
        cached = functools.lru_cache(maxsize)(lambda on, *args, **kw: factory(*args, **kw))

        @functools.wraps(factory)
        def call(*args, **kwargs):
            return cached(PLAIN, *args, **kwargs)
        call.cache_clear = cached.cache_clear
        return call
    return wrap


def in_xla():
    """True while tracing code that XLA will compile (jit_compile=True), where XLA-only ops work."""
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


# ---------------------------------------------------------------- gradients that save less

_GELU_C = math.sqrt(2 / math.pi)


def gelu(plain_gelu, x):
    """= model.gelu; its gradient keeps only x for backprop and recomputes the tanh there, so
    training holds one [..., 4 * n_embd] tensor per block for it instead of three."""
    @tf.custom_gradient
    def f(x):
        def grad(dy):
            # Under XLA, a barrier keeps the tanh below from being merged with the forward one
            # (which would keep that alive after all).
            z = xla.optimization_barrier(x, dy)[0] if in_xla() else x
            t = tf.tanh(_GELU_C * (z + 0.044715 * tf.pow(z, 3)))
            return dy * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C *
                         (1 + 3 * 0.044715 * z * z))
        return plain_gelu(x), grad
    return f(x)


def norm(plain_norm, x, p, *, eps=1e-5):
    """= model.norm, (x - mean) * rsqrt(var + eps) * g + b, with its backward written out: from
    TF's own gradient XLA fused the residual stream's gradient into every layer's copy of it and
    recomputed the sum over all the layers above there."""
    @tf.custom_gradient
    def f(x, g, b):
        u = tf.reduce_mean(x, axis=-1, keepdims=True)
        r = tf.math.rsqrt(tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True) + eps)

        def grad(dy):
            xhat = (x - u) * r
            dxhat = dy * g
            dx = (dxhat - tf.reduce_mean(dxhat, axis=-1, keepdims=True) -
                  xhat * tf.reduce_mean(dxhat * xhat, axis=-1, keepdims=True)) * r
            rows = list(range(len(x.shape) - 1))
            return dx, tf.reduce_sum(dy * xhat, rows), tf.reduce_sum(dy, rows)
        return (x - u) * r * g + b, grad
    return f(x, p['g'], p['b'])


def recomputed(block):
    """A block_fn for model.hidden that equals `block` but keeps only each block's input for
    backprop and runs the block again there: about a third more compute, for activation memory
    that no longer grows with n_layer. Plainly, the block itself."""
    if PLAIN:
        return block

    def block_fn(x, p, **kw):
        # Leaves go in as arguments (not closed over) so their gradients come back out.
        f = _recomputed(lambda x, *leaves: block(x, tf.nest.pack_sequence_as(p, leaves), **kw)[0])
        return f(x, *tf.nest.flatten(p)), None
    return block_fn


def _recomputed(f):
    """f(*tensors) -> tensor, keeping only its inputs for backprop and running it again there.

    tf.recompute_grad orders the rerun after the incoming gradient by adding a NaN-guarded zero
    to every input, weights included, which under XLA halved the speed. Here an XLA optimization
    barrier over (inputs, gradient) orders it, and such a zero goes into the activations only, so
    that XLA cannot merge the rerun with the forward pass (the barrier alone did not stop that);
    outside XLA a control dependency does the ordering.
    """
    @tf.custom_gradient
    def inner(*args):
        def grad(dy):
            if in_xla():
                *xs, dy = xla.optimization_barrier(*args, dy)
                # A zero that depends on dy, added to the activations only (not the weights):
                # without it XLA merged the rerun with the forward pass and kept its activations.
                zero = tf.cast(tf.math.is_finite(tf.reshape(dy, [-1])[0]), dy.dtype) * 0
                xs[0] = xs[0] + zero
            else:
                with tf.control_dependencies([dy]):
                    xs = [tf.identity(a) for a in args]
            with tf.GradientTape() as tape:
                tape.watch(xs)
                y = f(*xs)
            return tape.gradient(y, xs, output_gradients=dy)
        return f(*args), grad
    return inner


# ---------------------------------------------------------------- decoding: weights read faster

def for_decoding(params, dtype='fp32'):
    """The tree as tensors laid out for decoding, its matrices stored as `dtype` (see
    gpt2/precision.py): each conv1d {'w' [1, nx, nf], 'b'} becomes {'w_t' [nf, nx], 'b'}
    (w_t = transpose(w[0])), which linear reads faster for few rows, plus 'scale' [nf] for int8;
    a narrow wte becomes {'table' [n_vocab, n_embd]} (plus 'scale' [n_vocab] for int8). A copy for
    reading, not a checkpoint layout; a tree already in this layout comes back as it is. Plainly,
    the tree with its matrices rounded as such a copy holds them, in float32."""
    precision.check_dtype(dtype)
    if PLAIN:
        return _tensors(precision.rounded(params, dtype) if dtype != 'fp32' else params)
    if params['h'] and 'w_t' in params['h'][0]['attn']['c_attn']:
        return params

    def narrow(w):
        # [n, k] with output channels as rows -> (the matrix as stored, its int8 scale or None)
        if dtype == 'int8':
            return precision.quantize(w)
        return tf.cast(w, tf.bfloat16 if dtype == 'bf16' else tf.float32), None

    def conv1d(p):
        w_t, scale = narrow(tf.transpose(tf.convert_to_tensor(p['w'], tf.float32)[0]))
        return {'w_t': w_t, 'b': p['b'], **({} if scale is None else {'scale': scale})}

    def wte(w):
        table, scale = narrow(tf.convert_to_tensor(w, tf.float32))
        if dtype == 'fp32':
            return table
        return {'table': table, **({} if scale is None else {'scale': scale})}

    return _tensors(precision.map_matrices(params, conv1d, wte))


def _tensors(tree):
    return tf.nest.map_structure(
        lambda x: x if isinstance(x, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(x), tree)


def _wide(w, x):
    """A narrow (bf16, int8) matrix read as x's type inside the product with x: XLA fuses the
    conversion into a one-row product, so only the narrow bytes are read (BENCHMARKS.md). For
    one row under XLA a zero computed from x is added to its bits first: left loop-invariant in
    the decode loop, the conversion was hoisted out of it and every step read a wide copy. For
    more rows that hoisting is left alone (one wide copy per call of the loop): XLA's fused
    conversion is slower than its own product of several rows."""
    if w.dtype == x.dtype:
        return w
    if in_xla() and x.shape[0] == 1:
        x0 = tf.reshape(x, [-1])[0]
        bits = tf.int8 if w.dtype == tf.int8 else tf.int16
        zero = tf.cast(x0 != x0, bits)       # 0 (1 where x holds NaN, which the product is)
        w = tf.bitcast(tf.bitcast(w, bits) + zero, w.dtype)
    return tf.cast(w, x.dtype)


def linear(plain_linear, x, p):
    """= model.linear, x @ w[0] + b, also for a for_decoding tree's w_t [nf, nx] (w_t = w[0]^T,
    times `scale` per output channel for int8): few rows under XLA as (w_t x^T)^T, more as
    x w_t^T."""
    if 'w_t' not in p:
        return plain_linear(x, p)
    nf, nx = p['w_t'].shape
    x2 = tf.reshape(x, [-1, nx])
    w_t = _wide(p['w_t'], x2)
    scale = p.get('scale')
    if _few(x2):
        y = _few_rows_matmul(w_t, x2)
        y = tf.transpose((y if scale is None else y * scale[:, None]) + p['b'][:, None])
    else:
        y = tf.matmul(x2, w_t, transpose_b=True)
        y = (y if scale is None else y * scale) + p['b']
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [nf]], 0))


def embed(plain_embed, params, tokens, positions):
    """= model.embed, also for a for_decoding tree's wte {'table', 'scale'}: the rows gathered,
    then widened (and scaled, for int8)."""
    wte = params['wte']
    if not isinstance(wte, dict):
        return plain_embed(params, tokens, positions)
    table = wte['table']
    if table.dtype == tf.bfloat16:
        # gathered as 16-bit integers: XLA's CPU backend widens a bf16 gather's whole table
        rows = tf.bitcast(tf.gather(tf.bitcast(table, tf.int16), tokens), tf.bfloat16)
    else:
        rows = tf.gather(table, tokens)
    rows = tf.cast(rows, tf.float32)
    if 'scale' in wte:
        rows = rows * tf.gather(wte['scale'], tokens)[..., None]
    return rows + tf.gather(params['wpe'], positions)


def unembed(plain_unembed, h, wte):
    """= model.unembed, h wte^T, also for a for_decoding tree's wte {'table', 'scale'}: for few
    rows under XLA as (wte h^T)^T."""
    if not isinstance(wte, dict):
        if _few(h) and wte.dtype == h.dtype:
            return tf.transpose(_few_rows_matmul(wte, h))
        return plain_unembed(h, wte)
    table, scale = wte['table'], wte.get('scale')
    table = _wide(table, h)
    if _few(h):
        y = _few_rows_matmul(table, h)
        return tf.transpose(y if scale is None else y * scale[:, None])
    y = plain_unembed(h, table)
    return y if scale is None else y * scale


def _few(x2):
    # A statically short [rows, n] input under XLA (a decode step, a short prompt).
    return x2.shape[0] is not None and x2.shape[0] <= FEW_ROWS and in_xla()


def _few_rows_matmul(w_t, x2):
    """w_t [n, k], x2 [rows, k] -> [n, rows]: w_t x2^T, for few rows under XLA.

    XLA's CPU matmul reads a [n, k] weight faster as the left operand against the rows transposed
    than as x2 @ w, but folds a transpose of the result back into the slower form: the barrier
    keeps the product as written."""
    return xla.optimization_barrier(tf.matmul(w_t, x2, transpose_b=True))[0]


def write_cache(plain_write, buffer, present, pos):
    """= model.write_cache (the buffer with `present` put at slot pos); under XLA an in-place
    update of a loop-carried buffer instead of a concatenation that copies it."""
    if not in_xla():
        return plain_write(buffer, present, pos)
    zero = tf.zeros([], tf.int32)
    return xla.dynamic_update_slice(buffer, present, [zero] * 3 + [tf.cast(pos, tf.int32), zero])


# ---------------------------------------------------------------- attention

def attend(plain_attend, q, k, v, mask, *, causal=False):
    """= model.attend, softmax(q k^T / sqrt(head_dim), masked) v. One query per row (a decode
    step): a broadcast product and a sum, which XLA streams through in one pass, instead of
    batch x n_head matmuls of one row. Causal without a cache: a block of ATTN_BLOCK queries
    needs the keys up to its own end only, so skipping the rest saves nearly half the work (and
    the saved weights)."""
    seq = q.shape[2]
    if seq == 1:
        scale = tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype))
        w = tf.where(mask, tf.reduce_sum(q * k, axis=-1)[:, :, None] * scale,
                     tf.constant(q.dtype.min, q.dtype))
        w = tf.nn.softmax(w)
        return tf.reduce_sum(tf.transpose(w, [0, 1, 3, 2]) * v, axis=2, keepdims=True)
    if causal and seq is not None and seq >= 2 * ATTN_BLOCK:
        b = ATTN_BLOCK
        return tf.concat([plain_attend(q[:, :, i:i + b], k[:, :, :i + b], v[:, :, :i + b],
                                       mask[..., i:i + b, :i + b])
                          for i in range(0, seq, b)], axis=2)
    return plain_attend(q, k, v, mask)


# ---------------------------------------------------------------- the loss

def cross_entropy(plain_cross_entropy, x, wte, targets):
    """= model.cross_entropy, by fused_head_loss."""
    return fused_head_loss(x, wte, targets)


def fused_head_loss(x, wte, targets, *, rows=None):
    """mean(logsumexp(x wte^T) - (x wte^T)[target]) over the n rows of x [n, n_embd] (targets
    [n]), with its gradients for x and wte worked out in the same pass, a block of at most `rows`
    (LOSS_ROWS) rows at a time in a loop: the [n, n_vocab] logits, their softmax and its gradient
    never exist whole (at 1 x 1024 on 124M they are 206 MB each), and nothing is recomputed. A
    row's loss has gradient softmax - one_hot for its logits. Any n works: the last block is
    padded, not a smaller block size chosen. It computes the gradients even when none is taken,
    so evaluation calls model.cross_entropy.plain."""
    n, d = x.shape
    c = wte.dtype  # the products' type (mixed precision: bf16 or fp16); the rest in float32
    rows = min(rows or LOSS_ROWS, n)
    blocks = -(-n // rows)
    pad = blocks * rows - n       # the last block is padded with rows that count for nothing
    n_vocab = wte.shape[0]
    targets = tf.pad(targets, [[0, pad]])
    valid = tf.pad(tf.ones([n], tf.float32), [[0, pad]])

    @tf.custom_gradient
    def loss(x, wte):
        xp = tf.pad(x, [[0, pad], [0, 0]])

        def one(i):
            # Block i: its summed loss and its parts of the gradients for x and wte.
            xi = tf.slice(xp, [i * rows, 0], [rows, d])
            ti = tf.slice(targets, [i * rows], [rows])
            vi = tf.slice(valid, [i * rows], [rows])
            xi = tf.cast(xi, c)
            logits = tf.cast(tf.matmul(xi, wte, transpose_b=True), tf.float32)  # [rows, n_vocab]
            lse = tf.reduce_logsumexp(logits, axis=-1)
            total = tf.reduce_sum((lse - tf.gather(logits, ti, batch_dims=1)) * vi)
            # The 1/n of the mean goes in here, where it costs nothing, rather than on dwte.
            g = tf.cast((tf.exp(logits - lse[:, None]) -
                         tf.one_hot(ti, n_vocab, dtype=tf.float32)) * (vi / n)[:, None], c)
            return (total, tf.cast(tf.matmul(g, wte), x.dtype),
                    tf.cast(tf.matmul(g, xi, transpose_a=True), tf.float32))

        def body(i, total, dx, dwte):
            # One wte-sized buffer carried through the loop, added to in place.
            t, dxi, dwi = one(i)
            return i + 1, total + t, dx.write(i, dxi), dwte + dwi

        # The first block outside the loop starts the sums (no zeroed wte-sized buffer to add to).
        total, dx, dwte = one(0)
        if blocks > 1:  # (XLA rejects a loop of at most 0 iterations that writes a TensorArray)
            _, total, dx, dwte = tf.while_loop(
                lambda i, *_: i < blocks, body,
                (tf.constant(1), total, tf.TensorArray(x.dtype, size=blocks).write(0, dx), dwte),
                maximum_iterations=blocks - 1)
            dx = dx.stack()

        def grad(dy):
            return (tf.reshape(dx, [blocks * rows, d])[:n] * tf.cast(dy, x.dtype),
                    tf.cast(dwte * dy, c))   # (dwte summed over the blocks in float32)
        return total / n, grad

    return loss(x, wte)


# ---------------------------------------------------------------- sampling filters without a sort

def _order_keys(logits):
    # int32 keys in the same order as the float32 values: flipping a negative float's lower 31
    # bits reverses the order among negatives and keeps them below the positives. -0.0 is made
    # +0.0 first: the two are one value (a tie), but their bits would give two keys.
    logits = tf.where(logits == 0, tf.zeros_like(logits), logits)
    bits = tf.bitcast(logits, tf.int32)
    return tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, tf.constant(0x7fffffff)), bits)


def _smallest_key(keys, pred):
    """[batch] the smallest int32 key t per row with pred(t [batch, 1]) [batch] true, for pred
    false then true as t grows and true at the row's largest key: 32 halvings of the key range,
    each a pass over the row, where XLA's CPU sort (and top_k, which uses it) costs more than the
    model's whole decode step (BENCHMARKS.md)."""
    lo, hi = tf.reduce_min(keys, axis=-1), tf.reduce_max(keys, axis=-1)
    one = tf.constant(1)
    for _ in range(32):
        # floor((lo + hi) / 2) without overflowing int32
        mid = (tf.bitwise.right_shift(lo, one) + tf.bitwise.right_shift(hi, one) +
               tf.bitwise.bitwise_and(tf.bitwise.bitwise_and(lo, hi), one))
        ok = pred(mid[:, None])
        hi = tf.where(ok, mid, hi)
        lo = tf.where(ok, lo, mid + 1)
    return lo


def top_k_logits(plain_top_k, logits, k):
    """= sampling.top_k_logits, its k-th largest logit found by halving the key range: the
    smallest key t with fewer than k keys above it."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keys = _order_keys(logits)
    kth = _smallest_key(keys, lambda t: tf.reduce_sum(tf.cast(keys > t, tf.int32), -1) < k)
    return tf.where(keys < kth[:, None], tf.constant(-math.inf, logits.dtype), logits)


def top_p_logits(plain_top_p, logits, p):
    """= sampling.top_p_logits, its least likely kept token found by halving the key range: the
    smallest key t with less than p of the probability strictly above it."""
    keys = _order_keys(logits)
    probs = tf.nn.softmax(logits)
    last = _smallest_key(
        keys, lambda t: tf.reduce_sum(tf.where(keys > t, probs, tf.zeros_like(probs)), -1) < p)
    return tf.where(keys < last[:, None], tf.constant(-math.inf, logits.dtype), logits)
