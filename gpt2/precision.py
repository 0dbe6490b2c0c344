"""Number formats. Decoding: the types a decoding copy of the weights is stored in (fp32, bf16,
int8) and what each rounds a weight to; the rounded weights, in float32, are what the plain math
decodes with, and gpt2/fast.py stores them narrow and reads them as such. Training: the compute
types of mixed precision (fp32, bf16, fp16) and fp16's dynamic loss scale."""
import numpy as np
import tensorflow as tf

from gpt2 import errors

# sample.py --dtype: the type of the weights' decoding copy. Only the matrices (every conv1d's w
# and wte, 99.6% of the bytes at 124M) are narrowed; biases, gains and wpe stay float32.
DTYPES = ('fp32', 'bf16', 'int8')
DTYPE_NOTE = ('fp32: as trained; bf16: matrices rounded to bfloat16 (half the bytes); int8: '
              'matrices as int8 with a float32 scale per output channel (a quarter)')
INT8_MAX = 127

# train.py --precision: the type the products are computed in. The weights (masters), the
# optimizer slots, layer norms, softmax and the loss stay float32.
PRECISIONS = ('fp32', 'bf16', 'fp16')
PRECISION_NOTE = ('fp32: everything in float32; bf16: products in bfloat16 (Ampere GPUs and '
                  'later, TPUs, CPUs with AVX512_BF16 or AMX); fp16: products in float16 with '
                  'a dynamic loss scale (older GPUs such as the T4)')
COMPUTE = {'fp32': tf.float32, 'bf16': tf.bfloat16, 'fp16': tf.float16}
# fp16's loss scale: starts at 2^15, halves on a step whose gradients overflow (that step's update
# is skipped), doubles after this many steps in a row that did not (PyTorch's GradScaler's rule).
LOSS_SCALE_START, LOSS_SCALE_GROWTH_STEPS = 2.0 ** 15, 2000


def check_precision(name):
    errors.check_choice('precision', name, PRECISIONS, note=PRECISION_NOTE)
    return name


def compute_copy(params, name):
    """The tree with its matrices (each conv1d's w and wte) cast to `name`'s compute type, for
    the products of mixed precision; the rest stays float32. Made inside the gradient tape from
    the float32 masters, so their gradients come back float32 through the casts."""
    c = COMPUTE[check_precision(name)]
    if c == tf.float32:
        return params
    return map_matrices(params, lambda p: dict(p, w=tf.cast(p['w'], c)),
                        lambda wte: tf.cast(wte, c))


def compute_block_copy(p, name):
    """compute_copy for one block's subtree p (training layer by layer casts a block at a
    time, so only one block's low-precision copy exists at once)."""
    c = COMPUTE[check_precision(name)]
    return p if c == tf.float32 else map_block(p, lambda q: dict(q, w=tf.cast(q['w'], c)))


def map_matrices(params, conv1d, wte):
    """The tree with each conv1d {'w', 'b'} replaced by conv1d(it) and wte by wte(it), the other
    leaves as they are: the one walk over the matrices that the copies of this module and
    fast.for_decoding make."""
    return dict(params, wte=wte(params['wte']), h=[map_block(p, conv1d) for p in params['h']])


def map_block(p, conv1d):
    """One block's subtree with each of its conv1d {'w', 'b'} replaced by conv1d(it)."""
    return dict(p, attn={k: conv1d(v) for k, v in p['attn'].items()},
                mlp={k: conv1d(v) for k, v in p['mlp'].items()})


def check_dtype(dtype):
    errors.check_choice('dtype', dtype, DTYPES, note=DTYPE_NOTE)
    return dtype


def quantize(w):
    """w [n, k] (n output channels of k inputs) -> (q int8 [n, k], scale float32 [n]) with
    w ~= q * scale[:, None]: symmetric, per output channel, scale = max|w| / 127 over the channel
    (1 for a channel of zeros), q = round(w / scale). Each weight is off by at most scale / 2."""
    w = tf.convert_to_tensor(w, tf.float32)
    amax = tf.reduce_max(tf.abs(w), axis=-1)
    scale = tf.where(amax > 0, amax / INT8_MAX, tf.ones_like(amax))
    q = tf.clip_by_value(tf.round(w / scale[:, None]), -INT8_MAX, INT8_MAX)
    return tf.cast(q, tf.int8), scale


def dequantize(q, scale):
    """The float32 weights [n, k] an int8 copy stands for."""
    return tf.cast(q, tf.float32) * scale[:, None]


def round_matrix(w, dtype):
    """w [n, k] (rows are output channels) as the `dtype` copy holds it, in float32."""
    if dtype == 'fp32':
        return tf.convert_to_tensor(w, tf.float32)
    if dtype == 'bf16':
        return tf.cast(tf.cast(w, tf.bfloat16), tf.float32)
    return dequantize(*quantize(w))


def rounded(params, dtype):
    """The tree with every matrix rounded as a `dtype` decoding copy stores it, as float32
    tensors: the weights such a copy decodes with. conv1d weights [1, nx, nf] have nf output
    channels (a column each); wte's output channels, in the tied output layer, are its rows."""
    check_dtype(dtype)

    def conv1d(p):
        w = tf.convert_to_tensor(p['w'], tf.float32)[0]
        return dict(p, w=tf.transpose(round_matrix(tf.transpose(w), dtype))[None])

    return map_matrices(params, conv1d, lambda wte: round_matrix(wte, dtype))


def copy_bytes(spec, dtype):
    """The bytes a `dtype` decoding copy of a tree holds, from its leaves' shapes (`spec`, the
    tree of model.Param): what rounded() narrows takes 4, 2 or 1 bytes a value, plus int8's
    float32 scale per output channel; the rest 4."""
    item = {'fp32': 4, 'bf16': 2, 'int8': 1}[check_dtype(dtype)]

    def matrix(shape, channels):
        return int(np.prod(shape)) * item + (4 * channels if dtype == 'int8' else 0)

    # conv1d w [1, nx, nf] has nf output channels, wte [n_vocab, n_embd] n_vocab
    sizes = map_matrices(spec, lambda p: dict(p, w=matrix(p['w'].shape, p['w'].shape[-1])),
                         lambda wte: matrix(wte.shape, wte.shape[0]))
    return sum(x if isinstance(x, int) else 4 * int(np.prod(x.shape))
               for x in tf.nest.flatten(sizes))


def nbytes(tree):
    """Bytes held by a tree's leaves (arrays, tensors or variables)."""
    return sum(int(np.prod(x.shape)) * tf.as_dtype(x.dtype).size for x in tf.nest.flatten(tree))
