"""How likely a text is under a checkpoint: per-token log-probabilities, loss and perplexity;
sample.py score."""
import math
import os

import numpy as np
import tensorflow as tf

from gpt2 import fast
from gpt2 import model
from gpt2 import sampling
from gpt2 import source
from gpt2.errors import UserError


@fast.built(maxsize=8)
def _make_logprobs(hparams):
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


def run(s, *, file, text, tokens):
    """sample.py score (its --help says what each flag means): --file or --text under the
    checkpoint settings.SampleSettings `s` name; prints its loss, perplexity and bits per byte,
    after each token's log-probability with `tokens`."""
    if (file is None) == (text is None):
        raise UserError('give one of --file or --text to score')
    if file is not None:
        if not os.path.isfile(file):
            raise UserError(f'file to score {file} does not exist')
        with open(file, encoding='utf-8', errors='replace') as f:
            text = f.read()
    text = str(text)
    params, hparams, prefix, enc = source.load(s)
    ids = enc.encode(text)
    if not ids:
        raise UserError('the text to score is empty')
    lp = score(hparams, fast.for_decoding(params, s.dtype), ids,
               context_token=sampling.start_token(hparams))
    if tokens:
        for t, v in zip(ids, lp):
            print(f'{v:10.4f}\t{enc.decode([t])!r}')
    m = summary(lp, len(text.encode('utf-8')))
    print(f'checkpoint {prefix}: {m["tokens"]} tokens, loss {m["loss"]:.4f} nats/token, '
          f'perplexity {m["perplexity"]:.3f}, {m["bits_per_byte"]:.4f} bits/byte')
