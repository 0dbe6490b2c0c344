"""Optimizers as pure per-leaf update rules, and learning-rate schedules."""
import math

import numpy as np
import tensorflow as tf

from gpt2 import errors
from gpt2.errors import UserError

ADAMW_WEIGHT_DECAY = 0.01  # PyTorch's AdamW default; the other optimizers default to none
SCHEDULES = ('constant', 'linear', 'cosine')


# Each rule is pure: init(shape) -> {slot: zeros}, update(g, p, slots, lr, t, wd) -> (p, slots),
# with t the 1-based step. State is the slots tree, so saving it and loading it is exact.

def decays(name):
    # Weight decay on matrices and embeddings only, not on biases or layer-norm gains (nanoGPT, HF).
    return name.endswith('/w') or name in ('model/wte', 'model/wpe')


class Adam:
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


class SGD:
    """Plain stochastic gradient descent (L2 weight decay if asked)."""

    def init(self, shape):
        return {}

    def update(self, g, p, s, lr, t, wd):
        return p - lr * (g + wd * p if wd else g), {}


class Adafactor:
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


OPTIMIZERS = {'adam': lambda: Adam(False), 'adamw': lambda: Adam(True), 'sgd': SGD,
              'adafactor': Adafactor}


def get_optimizer(name):
    errors.check_choice('optimizer', name, OPTIMIZERS)
    return OPTIMIZERS[name]()


def default_weight_decay(optimizer):
    return ADAMW_WEIGHT_DECAY if optimizer == 'adamw' else 0.0


def scheduled_lr(step, *, base, schedule='constant', warmup=0, total=None):
    """The rate for 0-based `step`: linear warmup over `warmup` steps, then constant, or a linear or
    cosine decay to zero at step `total`."""
    errors.check_choice('lr_schedule', schedule, SCHEDULES)
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
