"""GPT-2's math: pure functions over a parameter tree keyed like OpenAI's checkpoint.

The tree is {'wte', 'wpe', 'h': [block, ...], 'ln_f'} with each block {'ln_1', 'attn': {'c_attn',
'c_proj'}, 'ln_2', 'mlp': {'c_fc', 'c_proj'}}; leaves have the checkpoint's shapes (conv1d weights
keep OpenAI's leading axis of 1); `spec` defines it. Leaves may be arrays, tensors or variables;
nothing here makes state. Mixed precision hands in a tree whose matrices (conv1d w, wte) are a
bfloat16 or float16 copy (gpt2/precision.py): the products run in the matrices' type, softmax
and the loss in float32, and the residual stream and layer norms stay in wpe's type (float32).
Functions marked @fast.beside have a faster twin in gpt2/fast.py that computes the same thing;
`fast.plain()` runs these plain versions everywhere.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

from gpt2 import fast


@dataclasses.dataclass(frozen=True)
class Param:
    """One leaf of the tree: its shape and OpenAI's initialiser (a normal's std, 'ones' or
    'zeros')."""
    shape: tuple
    init: object


def spec(hparams):
    """The parameter tree with a Param at each leaf: the one definition of the tree's names, shapes
    and initialisers, which init_params and checkpoint's shapes, flatten and unflatten follow."""
    d = hparams.n_embd

    def norm():
        return {'g': Param((d,), 'ones'), 'b': Param((d,), 'zeros')}

    def conv1d(nx, nf):  # OpenAI's conv1d keeps a leading axis of 1 on its weight
        return {'w': Param((1, nx, nf), 0.02), 'b': Param((nf,), 'zeros')}

    return {
        'wte': Param((hparams.n_vocab, d), 0.02),
        'wpe': Param((hparams.n_ctx, d), 0.01),
        'h': [{
            'ln_1': norm(),
            'attn': {'c_attn': conv1d(d, 3 * d), 'c_proj': conv1d(d, d)},
            'ln_2': norm(),
            'mlp': {'c_fc': conv1d(d, 4 * d), 'c_proj': conv1d(4 * d, d)},
        } for _ in range(hparams.n_layer)],
        'ln_f': norm(),
    }


def init_params(hparams, seed=0, dtype=np.float32):
    """A fresh tree with OpenAI's initialisers: N(0, 0.02) weights, N(0, 0.01) wpe, zero biases,
    unit gains."""
    rng = np.random.default_rng(seed)

    def init(p):
        if p.init == 'ones':
            return np.ones(p.shape, dtype)
        if p.init == 'zeros':
            return np.zeros(p.shape, dtype)
        return (rng.standard_normal(p.shape, dtype=np.float32) * p.init).astype(dtype)
    # (tf.nest visits dict keys sorted, which would change the draws; this keeps OpenAI's order.)
    return _map(init, spec(hparams))


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(fn, v) for v in tree]
    return fn(tree)


def to_tensors(params):
    """The same tree with NumPy leaves made constant tensors once (so compiled steps are not handed
    arrays to convert on every call); tensors and variables pass through, variables stay live."""
    return tf.nest.map_structure(
        lambda x: x if isinstance(x, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(x), params)


@fast.beside(fast.gelu)
def gelu(x):
    """[...] -> [...]: OpenAI's tanh approximation, not the erf form: the weights were trained with
    this one."""
    return 0.5 * x * (1 + tf.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


@fast.beside(fast.norm)
def norm(x, p, *, eps=1e-5):
    """[..., n_embd] -> [..., n_embd]: layer norm with OpenAI's epsilon, gain g and shift b."""
    u = tf.reduce_mean(x, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
    return (x - u) * tf.math.rsqrt(s + eps) * p['g'] + p['b']


@fast.beside(fast.linear)
def linear(x, p):
    """[..., nx] -> [..., nf]: OpenAI's conv1d, x @ w[0] + b with w of shape [1, nx, nf], in w's
    type."""
    w = p['w']
    nx, nf = w.shape[-2], w.shape[-1]
    y = tf.matmul(tf.cast(tf.reshape(x, [-1, nx]), w.dtype), tf.reshape(w, [nx, nf]))
    y = y + tf.cast(p['b'], w.dtype)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [nf]], 0))


def _split_heads(x, n_head):
    # [batch, seq, n_embd] -> [batch, n_head, seq, head_dim]
    b, s = tf.shape(x)[0], tf.shape(x)[1]
    return tf.transpose(tf.reshape(x, [b, s, n_head, x.shape[-1] // n_head]), [0, 2, 1, 3])


def _merge_heads(x):
    # [batch, n_head, seq, head_dim] -> [batch, seq, n_embd]
    b, s = tf.shape(x)[0], tf.shape(x)[2]
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b, s, x.shape[1] * x.shape[3]])


def masked(w, mask):
    """Where-masking rather than OpenAI's `w*b - 1e10*(1-b)`: the same softmax, and no overflow in
    fp16."""
    return tf.where(mask, w, tf.constant(w.dtype.min, w.dtype))


@fast.beside(fast.attend)
def attend(q, k, v, mask, *, causal=False):
    """q [batch, n_head, queries, head_dim], k, v [batch, n_head, keys, head_dim] ->
    [batch, n_head, queries, head_dim]: softmax(q k^T / sqrt(head_dim), masked by mask
    [batch, 1, queries, keys]) v, the softmax in float32. `causal` says the keys are the
    queries' own slots, from 0."""
    w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype))
    w = tf.nn.softmax(masked(tf.cast(w, tf.float32), mask))
    return tf.matmul(tf.cast(w, v.dtype), v)


@fast.beside(fast.write_cache)
def write_cache(buffer, present, pos):
    """A layer's buffer [2, batch, n_head, length, head_dim] with `present` (seq long) put at
    slots pos..pos+seq-1."""
    seq = tf.shape(present)[3]
    out = tf.concat([buffer[:, :, :, :pos], present, buffer[:, :, :, pos + seq:]], axis=3)
    return tf.ensure_shape(out, buffer.shape)


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
    a = attend(q, k, v, mask, causal=past is None)
    return linear(_merge_heads(a), p['c_proj']), present


def mlp(x, p):
    """[..., n_embd] -> [..., n_embd]"""
    return linear(gelu(linear(x, p['c_fc'])), p['c_proj'])


def block(x, p, *, n_head, mask, past=None, pos=0):
    """One pre-norm transformer block; returns the new x and this layer's keys and values (see
    attn)."""
    a, present = attn(norm(x, p['ln_1']), p['attn'], n_head=n_head, mask=mask, past=past, pos=pos)
    x = x + tf.cast(a, x.dtype)   # (the residual stream keeps its type under mixed precision)
    return x + tf.cast(mlp(norm(x, p['ln_2']), p['mlp']), x.dtype), present


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


@fast.beside(fast.embed)
def embed(params, tokens, positions):
    """tokens, positions [batch, seq] -> [batch, seq, n_embd]: token plus position embeddings, in
    wpe's type."""
    wpe = params['wpe']
    return tf.cast(tf.gather(params['wte'], tokens), wpe.dtype) + tf.gather(wpe, positions)


@fast.beside(fast.unembed)
def unembed(h, wte):
    """[rows, n_embd] -> logits [rows, n_vocab]: h wte^T (the output layer is tied to the token
    embedding), in wte's type."""
    return tf.matmul(tf.cast(h, wte.dtype), wte, transpose_b=True)


def head(hparams, params, h):
    """[batch, seq, n_embd] -> logits [batch, seq, n_vocab] (float32): the final norm, then
    unembed."""
    shape = tf.shape(h)
    logits = unembed(tf.reshape(norm(h, params['ln_f']), [-1, hparams.n_embd]), params['wte'])
    return tf.reshape(tf.cast(logits, tf.float32), tf.concat([shape[:-1], [hparams.n_vocab]], 0))


def hidden(hparams, params, tokens, *, cache=None, pos=0, start=None, block_fn=block):
    """tokens [batch, seq] -> (the last block's output [batch, seq, n_embd], cache): forward
    without the head. `block_fn` runs each block (training passes fast.recomputed(block))."""
    tokens = tf.convert_to_tensor(tokens)
    seq = tf.shape(tokens)[1]
    pos = tf.cast(pos, tf.int32)
    slots = pos + tf.range(seq)                                   # [seq]
    # Each row's first real slot; without `start` every row starts at 0, one row stands for all.
    offset = tf.zeros([1], tf.int32) if start is None else tf.cast(start, tf.int32)
    positions = tf.maximum(slots[None, :] - offset[:, None], 0)   # [batch or 1, seq]
    h = embed(params, tokens, positions)

    if cache is None:
        keys = slots                                              # attend to the new tokens
    else:
        keys = tf.range(cache[0].shape[-2])                       # attend over the whole buffer
    # A query sees the keys at or before its slot, from its row's first real slot on.
    mask = ((keys[None, None, :] <= slots[None, :, None]) &
            (keys[None, None, :] >= offset[:, None, None]))[:, None]   # [batch or 1, 1, seq, keys]

    presents = []
    for i, p in enumerate(params['h']):
        h, present = block_fn(h, p, n_head=hparams.n_head, mask=mask,
                              past=None if cache is None else cache[i], pos=pos)
        presents.append(present)
    return h, None if cache is None else tuple(presents)


def forward(hparams, params, tokens, *, cache=None, pos=0, start=None):
    """tokens [batch, seq] -> (logits [batch, seq, n_vocab], cache).

    Without a cache this is OpenAI's model() over the whole sequence, and the returned cache is
    None. With a cache (a buffer per layer, see empty_cache) the tokens occupy slots
    pos..pos+seq-1: they attend to slots before `pos` and causally to each other, and the returned
    cache has their keys and values written in. `start` [batch] (optional) marks each row's first
    real slot: slots before it are left padding, invisible to attention, and positions count from
    it, so prompts of different lengths can share one batch (right-aligned) and give what each
    would alone.
    """
    h, cache = hidden(hparams, params, tokens, cache=cache, pos=pos, start=start)
    return head(hparams, params, h), cache


@fast.beside(fast.cross_entropy)
def cross_entropy(h, wte, targets):
    """h [rows, n_embd] (after ln_f), targets [rows] -> the mean cross-entropy of the targets under
    the logits unembed(h, wte), taken in float32."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=targets, logits=tf.cast(unembed(h, wte), tf.float32)))


def loss(hparams, params, inputs, targets, *, block_fn=block):
    """inputs, targets [batch, seq] -> the mean next-token cross-entropy of predicting targets."""
    h, _ = hidden(hparams, params, inputs, block_fn=block_fn)
    return head_loss(hparams, params, h, targets)


def head_loss(hparams, params, h, targets):
    """The last block's output h [batch, seq, n_embd], targets [batch, seq] -> the mean
    cross-entropy of the targets under head(h) (ln_f and wte are all of `params` it reads)."""
    h = tf.reshape(norm(h, params['ln_f']), [-1, hparams.n_embd])
    return cross_entropy(h, params['wte'], tf.reshape(targets, [-1]))


def make_forward(hparams, *, jit_compile=None):
    """forward compiled once per input shape for these hparams.

    `params` stays an argument, so another tree of the same shapes (another checkpoint) reuses the
    trace; `pos` is passed as a tensor, so every position does too. `.tracing_count()` reports
    traces.
    """
    @fast.function(jit_compile=jit_compile)
    def step(params, tokens, cache, pos, start):
        return forward(hparams, params, tokens, cache=cache, pos=pos, start=start)

    def call(params, tokens, cache=None, pos=0, start=None):
        return step(params, tokens, cache, tf.constant(pos, tf.int32), start)

    call.tracing_count = step.experimental_get_tracing_count
    return call
