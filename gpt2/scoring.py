"""How likely a text is under a checkpoint: per-token log-probabilities, loss and perplexity."""
import functools
import math

import numpy as np
import tensorflow as tf

from gpt2 import fast
from gpt2 import model


def _make_logprobs(hparams):
    return _make_logprobs_for(hparams, fast.PLAIN)


@functools.lru_cache(maxsize=8)
def _make_logprobs_for(hparams, plain):
    @fast.function
    def logprobs(params, tokens):
        # tokens [1, seq] -> log p(tokens[t + 1] | tokens[:t + 1]) [seq - 1]
        logits, _ = model.forward(hparams, params, tokens)
        logp = tf.nn.log_softmax(logits[0, :-1])
        return tf.gather(logp, tokens[0, 1:], batch_dims=1)
    return logprobs


def score(hparams, params, ids, *, context_token):
    """Log-probability (natural log) of each of `ids` given the text before it.

    The first token is conditioned on `context_token` (<|endoftext|>, as OpenAI's samples start).
    Texts longer than n_ctx are read in windows that overlap by half, so every token past the
    first window sees at least n_ctx / 2 tokens of context. Returns a float64 array.
    """
    ids = [int(context_token)] + [int(t) for t in ids]
    n_ctx = hparams.n_ctx
    stride = max(1, n_ctx // 2)
    fn = _make_logprobs(hparams)
    out = np.zeros(len(ids) - 1, np.float64)
    begin, scored = 0, 0   # `scored` tokens of `ids[1:]` have a value
    while scored < len(ids) - 1:
        window = ids[begin:begin + n_ctx]
        lp = fn(params, tf.constant([window], tf.int32)).numpy()
        # Window position j predicts ids[begin + j + 1]; keep only the ones not yet scored.
        first = scored - begin
        out[scored:begin + len(window) - 1] = lp[first:]
        scored = begin + len(window) - 1
        begin += stride
    return out


def summary(logprobs, n_bytes=None):
    """{'tokens', 'loss' (mean nats per token), 'perplexity', 'bits_per_byte' if n_bytes}."""
    n = len(logprobs)
    loss = float(-np.mean(logprobs)) if n else float('nan')
    out = {'tokens': n, 'loss': loss, 'perplexity': math.exp(loss) if n else float('nan')}
    if n_bytes:
        out['bits_per_byte'] = float(-np.sum(logprobs) / math.log(2) / n_bytes)
    return out
