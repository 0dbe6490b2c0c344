"""Autoregressive sampling: logit filters, a compiled chunked decode loop, and the driver around it.

The decode loop is built once per (hparams, batch, cache length, filter kinds) and takes the
parameter tree(s) as arguments, so the tree can change at any token boundary without a retrace:
plain sampling runs one tree, the palimpsest sampler (gpt2/palimpsest.py) passes another per Span.
"""
import dataclasses
import os
import sys
from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from gpt2 import fast
from gpt2 import model
from gpt2 import settings
from gpt2.errors import UserError

EOT_ID = 50256            # <|endoftext|>: unconditional samples start from it
DEFAULT_CHUNK = 32        # tokens per call of the compiled loop (stop strings are checked between)
SLIDE_KEEP = 0.75         # past n_ctx, the window keeps this fraction of n_ctx as context
CACHE_ROUND = 32          # cache lengths round up to this, so nearby lengths share a compile
PAD = -1                  # what a finished row emits


# ---- filters: pure functions on logits [batch, n_vocab] ----

def apply_penalty(logits, seen, penalty):
    """CTRL's repetition penalty: tokens already in the text get logit / penalty when positive and
    logit * penalty when negative, so penalty > 1 always makes them less likely."""
    penalised = tf.where(logits > 0, logits / penalty, logits * penalty)
    return tf.where(seen, penalised, logits)


@fast.beside(fast.top_k_logits)
def top_k_logits(logits, k):
    """Keep the k largest logits (ties with the k-th are kept too); k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = tf.math.top_k(logits, k).values[:, -1:]
    return tf.where(logits < kth, tf.constant(-np.inf, logits.dtype), logits)


@fast.beside(fast.top_p_logits)
def top_p_logits(logits, p):
    """Nucleus filter: keep the most likely tokens whose probabilities, summed in descending order,
    first reach p (the most likely token is always kept); after top_k_logits, that is of the
    renormalised top-k distribution. A token is kept when the tokens more likely than it hold
    less than p in all, so every token tied with the least likely one kept stays too."""
    order = tf.argsort(logits, axis=-1, direction='DESCENDING')
    desc = tf.gather(logits, order, batch_dims=1)
    above = tf.cumsum(tf.gather(tf.nn.softmax(logits), order, batch_dims=1), axis=-1,
                      exclusive=True)   # what the tokens before each in that order hold
    kept = tf.maximum(tf.reduce_sum(tf.cast(above < p, tf.int32), axis=-1), 1)
    last = tf.gather(desc, kept - 1, batch_dims=1)
    return tf.where(logits < last[:, None], tf.constant(-np.inf, logits.dtype), logits)


def filter_logits(logits, *, temperature, top_k=0, top_p=None):
    """Temperature, then top-k, then top-p on the tempered and top-k-renormalised distribution
    (Hugging Face's order). `temperature` must be > 0 here (0 means greedy: see greedy)."""
    logits = logits / temperature
    logits = top_k_logits(logits, top_k)
    if top_p is not None:
        logits = top_p_logits(logits, top_p)
    return logits


def mix_logits(logits_list, weights):
    """log of the weighted mixture of the softmax distributions (weights sum to 1); a weight of 0
    drops a model entirely."""
    if len(logits_list) == 1:
        return logits_list[0]
    logp = tf.stack([tf.nn.log_softmax(l) for l in logits_list])   # [models, batch, n_vocab]
    logw = tf.math.log(tf.cast(weights, logp.dtype))[:, None, None]
    return tf.reduce_logsumexp(logp + logw, axis=0)


# ---- counter-based noise: the same sample whatever the batch it runs in ----

def _hash32(x):
    # lowbias32 (Chris Wellons): a well-mixed 32-bit integer hash, cheap on a whole vocabulary.
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7feb352d, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846ca68b, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def gumbel_noise(seed, rows, step, n_vocab):
    """[batch, n_vocab] Gumbel noise keyed on (seed [2] uint32, row id [batch], step): argmax of
    logits + noise is a draw from softmax(logits), and a row's draws do not depend on its batch."""
    seed = tf.cast(seed, tf.uint32)
    h = _hash32(seed[0] ^ _hash32(seed[1] + tf.constant(0x9e3779b9, tf.uint32)))
    h = _hash32(h ^ tf.cast(rows, tf.uint32))
    h = _hash32(h ^ _hash32(tf.cast(step, tf.uint32) + tf.constant(0x85ebca6b, tf.uint32)))
    v = tf.cast(tf.range(n_vocab), tf.uint32) * tf.constant(0x9e3779b9, tf.uint32)
    x = _hash32(_hash32(h[:, None] ^ v[None, :]))
    u = (tf.cast(tf.bitwise.right_shift(x, tf.constant(8, tf.uint32)), tf.float32) + 0.5) / 2 ** 24
    return -tf.math.log(-tf.math.log(u))


def draw(logits, *, temperature, top_k, top_p, noise):
    """One token per row [batch] int32 drawn from the filtered distribution (temperature > 0) with
    the Gumbel `noise` [batch, n_vocab]."""
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return tf.argmax(filtered + noise, axis=-1, output_type=tf.int32)


def greedy(logits):
    """The most likely token per row [batch] int32. The decode loop picks this or draw when it is
    built, not with a branch on the temperature inside it: under XLA a branch makes the output
    layer's matmul run in its slow form."""
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


# ---- the compiled chunk loop ----

@fast.built(maxsize=16)
def make_decoder(hparams, batch, length, *, chunk=DEFAULT_CHUNK, n_models=1, greedy_only=False,
                 top_k=0, top_p=False, penalty=False, jit_compile=None):
    """A compiled loop that writes up to `chunk` tokens per call, built once per these arguments
    and the plain switch (fast.plain()).

    Call it as decode(params, state, n, controls): `params` a tuple of n_models trees (swap them
    freely: same shapes, no retrace), `state` a dict (see Decoder), `n` the tokens to write (a
    tensor <= chunk), `controls` a dict of tensors (temperature, top_p, penalty, seed, weights,
    stop_mask). Returns (tokens [batch, chunk] with PAD past n or after a stop, new state).
    With `greedy_only` it always takes the most likely token, else it draws at the temperature
    given (> 0). `.tracing_count()` reports traces.
    """
    top_k = 0 if top_k >= hparams.n_vocab else top_k

    @fast.function(jit_compile=jit_compile)
    def decode(params, state, n, controls):
        start, rows = state['start'], state['rows']
        out = tf.fill([batch, chunk], PAD)
        cols = tf.range(chunk)[None, :]

        def body(i, caches, last, pos, step, seen, done, out):
            logits_list, new_caches = [], []
            for p, c in zip(params, caches):
                lg, c = model.forward(hparams, p, last[:, None], cache=c, pos=pos, start=start)
                logits_list.append(lg[:, -1])
                new_caches.append(c)
            logits = mix_logits(logits_list, controls['weights'])
            if penalty:
                logits = apply_penalty(logits, seen, controls['penalty'])
            if greedy_only:
                tok = greedy(logits)
            else:
                tok = draw(logits, temperature=controls['temperature'], top_k=top_k,
                           top_p=controls['top_p'] if top_p else None,
                           noise=gumbel_noise(controls['seed'], rows, step, hparams.n_vocab))
            out = tf.where(cols == i, tf.where(done, PAD, tok)[:, None], out)
            if penalty:
                seen = seen | tf.cast(tf.one_hot(tok, hparams.n_vocab, dtype=tf.int8), tf.bool)
            done = done | tf.gather(controls['stop_mask'], tok)
            return i + 1, tuple(new_caches), tok, pos + 1, step + 1, seen, done, out

        def cond(i, caches, last, pos, step, seen, done, out):
            return (i < n) & ~tf.reduce_all(done)

        _, caches, last, pos, step, seen, done, out = tf.while_loop(
            cond, body, (tf.constant(0), tuple(state['caches']), state['last'], state['pos'],
                         state['step'], state['seen'], state['done'], out),
            maximum_iterations=chunk)
        new = dict(state, caches=caches, last=last, pos=pos, step=step, seen=seen, done=done)
        return out, new

    decode.tracing_count = decode.experimental_get_tracing_count
    return decode


@fast.built(maxsize=16)
def _make_prefill(hparams, *, jit_compile=None):
    @fast.function(jit_compile=jit_compile)
    def prefill(params, tokens, cache, start):
        _, cache = model.forward(hparams, params, tokens, cache=cache, pos=0, start=start)
        return cache
    return prefill


def _bucket(n, cap):
    # Prefill lengths round up to a power of two so a few compiles serve every prompt length.
    b = 16
    while b < n:
        b *= 2
    return min(b, cap)


class Decoder:
    """Drives the compiled loop for one batch of rows: prefill, chunks, sliding past n_ctx.

    `rows` hold every token of each row's text so far (prompt, then generated); the cache holds
    all of them right-aligned to a common end except each row's last, which the next step feeds.
    """

    def __init__(self, hparams, batch, length, *, n_models=1, greedy_only=False, top_k=0,
                 top_p=False, penalty=False, chunk=DEFAULT_CHUNK, jit_compile=None):
        self.hparams, self.batch, self.length = hparams, batch, length
        self.n_models = n_models
        self.decode = make_decoder(hparams, batch, length, chunk=chunk, n_models=n_models,
                                   greedy_only=greedy_only, top_k=top_k, top_p=top_p,
                                   penalty=penalty, jit_compile=jit_compile)
        self.prefill_fn = _make_prefill(hparams, jit_compile=jit_compile)
        self.chunk = chunk
        self.state = None

    def prefill(self, params, rows, *, row_ids, steps=None, done=None):
        """(Re)build the cache from `rows` (lists of ids, at most `length` each) with `params`
        (a tuple of n_models trees). Keeps the per-row generation counters in `steps`."""
        hp, b, L = self.hparams, self.batch, self.length
        assert len(rows) == b and all(1 <= len(r) <= L for r in rows)
        end = max(len(r) for r in rows)
        n = _bucket(end - 1, L) if end > 1 else 0
        tokens = np.zeros([b, max(n, 1)], np.int32)
        start = np.zeros([b], np.int32)
        last = np.zeros([b], np.int32)
        seen = np.zeros([b, hp.n_vocab], bool)
        for i, r in enumerate(rows):
            start[i] = end - len(r)
            tokens[i, start[i]:end - 1] = r[:-1]
            last[i] = r[-1]
            seen[i, r] = True
        caches = []
        for p in params:
            cache = model.empty_cache(hp, b, L)
            if n:
                cache = self.prefill_fn(p, tf.constant(tokens[:, :n]), cache, tf.constant(start))
            caches.append(cache)
        self.state = {
            'caches': tuple(caches), 'last': tf.constant(last), 'pos': tf.constant(end - 1),
            'step': tf.constant(0 if steps is None else steps, tf.int32),
            'seen': tf.constant(seen), 'start': tf.constant(start),
            'done': tf.constant(np.zeros([b], bool) if done is None else done),
            'rows': tf.constant(np.asarray(row_ids, np.int32)),
        }

    def room(self):
        """Tokens that fit before the cache is full."""
        return self.length - int(self.state['pos'])

    def run(self, params, n, controls):
        """Write n tokens (n <= chunk and <= room()); returns [batch, n] ids, PAD when finished."""
        assert 0 < n <= min(self.chunk, self.room())
        out, self.state = self.decode(tuple(params), self.state, tf.constant(n, tf.int32),
                                      controls)
        return out.numpy()[:, :n]


# ---- the public entry points ----

class Span(NamedTuple):
    """From new token `start` on, the tokens come from the parameter trees `trees()` returns: a
    tuple, whose next-token distributions are mixed by `weights` when it holds more than one.
    `trees` is a function so that the palimpsest's Store loads a checkpoint only when its span
    is reached."""
    start: int
    trees: Callable[[], tuple]
    weights: tuple = (1.0,)

    @classmethod
    def fixed(cls, tree, start=0):
        """A span of one tree already in memory."""
        return cls(start, lambda: (tree,))


def new_seed():
    """A fresh random seed, to be printed so the run can be repeated."""
    return int.from_bytes(os.urandom(4), 'little') & 0x7fffffff


def seeded(s):
    """settings.SampleSettings `s` with a seed: theirs, or a fresh one."""
    return dataclasses.replace(s, seed=new_seed() if s.seed is None else int(s.seed))


def seed_pair(seed):
    # Any Python int -> two uint32 words for the noise hash.
    seed = int(seed) % (1 << 64)
    return np.array([seed & 0xffffffff, seed >> 32], np.uint32)


def make_controls(hparams, *, temperature, top_p, repetition_penalty, seed, stop_ids=(),
                  weights=(1.0,)):
    """The compiled loop's `controls` (see make_decoder): these values as tensors."""
    stop_mask = np.zeros([hparams.n_vocab], bool)
    for t in stop_ids:
        stop_mask[t] = True
    return {
        'temperature': tf.constant(float(temperature), tf.float32),
        'top_p': tf.constant(float(top_p), tf.float32),
        'penalty': tf.constant(float(repetition_penalty), tf.float32),
        'seed': tf.constant(seed_pair(seed)),
        'weights': tf.constant(np.asarray(weights, np.float32)),
        'stop_mask': tf.constant(stop_mask),
    }


def cache_length(hparams, needed):
    """Cache slots for a run needing `needed` tokens: rounded up, at most n_ctx."""
    return min(hparams.n_ctx, -(-needed // CACHE_ROUND) * CACHE_ROUND)


def start_token(hparams):
    """<|endoftext|>, or the last id of a smaller test vocabulary."""
    return EOT_ID if hparams.n_vocab > EOT_ID else hparams.n_vocab - 1


def check_prompts(hparams, prompts, *, slide=True):
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f'prompt {i + 1} is empty: give at least one token (or none at all '
                            'for unconditional samples)')
        bad = [t for t in p if not 0 <= t < hparams.n_vocab]
        if bad:
            raise UserError(f'prompt {i + 1} has token ids outside the vocabulary '
                            f'(0..{hparams.n_vocab - 1}): {bad[:5]}')
        if len(p) > hparams.n_ctx and not slide:
            raise UserError(f'prompt {i + 1} is {len(p)} tokens, longer than the model\'s context '
                            f'n_ctx={hparams.n_ctx}; shorten it or allow sliding')


def window(row, hparams):
    """The tail of a row that the model reads after the cache fills: SLIDE_KEEP of n_ctx."""
    keep = max(1, int(hparams.n_ctx * SLIDE_KEEP))
    return row[-keep:]


def generate(hparams, params, *, prompts=None, stop_ids=(), jit_compile=None, progress=None,
             **flags):
    """Sample `nsamples` continuations; returns the NEW token ids of each (a list of lists).

    `flags` are settings.SampleSettings' sampling ones (nsamples, batch_size, length, temperature,
    top_k, top_p, repetition_penalty, seed), with its defaults and checks. `prompts` is a list of
    token-id lists, one per sample (None: unconditional, from <|endoftext|>); a row ends early at
    any id in `stop_ids` (not included). Sample i uses noise keyed on (seed, i, step), so it is
    the same whatever the batch size. Lengths past n_ctx slide the context window.
    """
    s = seeded(settings.SampleSettings(**flags))
    if prompts is None:
        prompts = [[start_token(hparams)]] * s.nsamples
    if len(prompts) != s.nsamples:
        raise UserError(f'got {len(prompts)} prompts for nsamples={s.nsamples}; give one per '
                        'sample')
    prompts = [list(map(int, p)) for p in prompts]
    check_prompts(hparams, prompts)
    return run_spans(hparams, [Span.fixed(fast.for_decoding(params))], s, prompts=prompts,
                     stop_ids=stop_ids, jit_compile=jit_compile, progress=progress)['tokens']


def run_spans(hparams, spans, s, *, prompts, stop_ids=(), stop_strings=(), decode_text=None,
              recompute=False, jit_compile=None, progress=None, chunk=DEFAULT_CHUNK, on_span=None):
    """The driver shared by plain and palimpsest sampling.

    `spans` is a list of Span sorted by start, the first at 0; `s` the settings.SampleSettings
    whose batch_size, length, temperature, top_k, top_p, repetition_penalty and seed (not None:
    see seeded) it samples with. With `recompute`, the cache is rebuilt from the text with each
    span's trees as it begins; otherwise it keeps what earlier trees wrote. Rows end at
    `stop_ids` inside the loop and at `stop_strings` (needs `decode_text`) between chunks.
    Returns {'tokens': new ids per sample, 'texts': decoded and cut at stop strings or None,
    'tracing_count': traces of the compiled loop so far}.
    """
    n_models = len(spans[0].weights)
    assert spans[0].start == 0 and all(len(span.weights) == n_models for span in spans)
    assert s.seed is not None
    L = cache_length(hparams, max(len(p) for p in prompts) + s.length)
    dec = Decoder(hparams, s.batch_size, L, n_models=n_models, greedy_only=s.temperature == 0,
                  top_k=s.top_k, top_p=s.top_p < 1, penalty=s.repetition_penalty != 1,
                  chunk=chunk, jit_compile=jit_compile)
    # The compiled loop's controls, once for each weighting the spans use (only their weights
    # differ: a palimpsest's hundred turns share one).
    controls = {w: make_controls(hparams, temperature=s.temperature, top_p=s.top_p,
                                 repetition_penalty=s.repetition_penalty, seed=s.seed,
                                 stop_ids=stop_ids, weights=w)
                for w in {tuple(span.weights) for span in spans}}
    ends = [span.start for span in spans[1:]] + [s.length]
    results, texts = [], []
    for b0 in range(0, len(prompts), s.batch_size):
        batch = _Batch(prompts[b0:b0 + s.batch_size], b0, s.batch_size, len(prompts))
        done_steps = span_i = 0
        dec.prefill(spans[0].trees(), [window(r, hparams) if len(r) > L else r
                                       for r in batch.rows], row_ids=batch.row_ids,
                    done=batch.ended)
        while done_steps < s.length and not batch.ended.all():
            while span_i + 1 < len(spans) and spans[span_i + 1].start <= done_steps:
                span_i += 1
                if recompute:
                    _rebuild(dec, spans[span_i].trees(), batch, done_steps, L, hparams)
            if on_span is not None:
                on_span(span_i, done_steps)
            if dec.room() == 0:
                _rebuild(dec, spans[span_i].trees(), batch, done_steps, L, hparams)
            n = min(dec.chunk, dec.room(), ends[span_i] - done_steps)
            span = spans[span_i]
            batch.take(dec.run(span.trees(), n, controls[tuple(span.weights)]), stop_ids,
                       stop_strings, decode_text)
            done_steps += n
            if progress is not None:
                progress(n)
        for tokens, text in batch.results(decode_text):
            results.append(tokens)
            texts.append(text)
    return {'tokens': results, 'texts': texts, 'tracing_count': dec.decode.tracing_count()}


def progress_bar(total, quiet):
    """(update, close) for run_spans' `progress`: a bar of `total` tokens on stderr, or none when
    `quiet` or for under 200 tokens."""
    if quiet or total < 200:
        return None, lambda: None
    import tqdm
    bar = tqdm.tqdm(total=total, unit='tok', file=sys.stderr, leave=False)
    return bar.update, bar.close


class _Batch:
    """The rows of one batch while they are generated: `rows` (prompt and new tokens, what the
    model reads), `gen` (the new tokens kept), `ended`, and where a stop string cut each row's
    text. Rows past the prompts pad the batch; they start ended and are dropped."""

    def __init__(self, prompts, first, batch_size, n_prompts):
        self.real = len(prompts)
        pad = batch_size - self.real
        self.rows = [list(p) for p in prompts] + [list(prompts[0]) for _ in range(pad)]
        # Each row's id keys its noise: sample i draws the same whatever batch it runs in.
        self.row_ids = [first + r for r in range(self.real)] + [n_prompts + j for j in range(pad)]
        self.gen = [[] for _ in self.rows]
        self.ended = np.array([False] * self.real + [True] * pad)
        self.cut = [None] * batch_size

    def take(self, out, stop_ids, stop_strings, decode_text):
        """Add a chunk of new tokens [batch, n] (PAD after a row ended inside the loop); a row
        ends at a stop id (not kept) or, between chunks, when its text holds a stop string."""
        for r, toks in enumerate(out):
            if self.ended[r]:
                continue
            if (toks == PAD).any():
                toks = toks[:int(np.argmax(toks == PAD))]
            stop_at = next((k for k, t in enumerate(toks) if t in stop_ids), None)
            if stop_at is not None:
                self.gen[r] += toks[:stop_at].tolist()
                self.rows[r] += toks[:stop_at + 1].tolist()
                self.ended[r] = True
                continue
            self.gen[r] += toks.tolist()
            self.rows[r] += toks.tolist()
            if stop_strings and decode_text is not None:
                text = decode_text(self.gen[r])
                hits = [text.find(s) for s in stop_strings if s in text]
                if hits:
                    self.cut[r] = min(hits)
                    self.ended[r] = True

    def results(self, decode_text):
        """(new tokens, text or None) per real row; a row cut at a stop string keeps the tokens
        whose text fits before the cut."""
        for r in range(self.real):
            gen = self.gen[r]
            if self.cut[r] is None:
                yield gen, (decode_text(gen) if decode_text is not None else None)
                continue
            text = decode_text(gen)[:self.cut[r]]
            k = len(gen)
            while k and len(decode_text(gen[:k])) > self.cut[r]:
                k -= 1
            yield gen[:k], text


def _rebuild(dec, params, batch, steps, L, hparams):
    # Re-read each row's text with `params`: for recompute mode, and to slide past a full cache.
    keep = [window(r, hparams) if len(r) >= L else r for r in batch.rows]
    dec.prefill(params, keep, row_ids=batch.row_ids, steps=steps, done=batch.ended.copy())
