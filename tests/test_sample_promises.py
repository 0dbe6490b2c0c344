"""Proofs of what README.md promises about sample.py, scoring and the palimpsest sampler.

Each test builds its expected result independently of the code under test (full forwards and
NumPy, Hugging Face's top-p, sample.py's own flags run separately), and its docstring names the
break in the library that it was seen to catch.
"""
import functools
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint, model, palimpsest, sampling, scoring
from gpt2 import settings
from tests.conftest import ROOT, run_sample_py
from tests.helpers import VOCAB_HP, sampled, save_toy, sharp

IN_CI = os.environ.get('CI', '').lower() == 'true'

def log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _forward(hp):
    @tf.function
    def forward(params, tokens):
        return model.forward(hp, params, tokens)[0]
    return forward


def full_logits(hp, params, toks):
    """The last position's logits of a plain forward (no cache) over the whole of `toks`, as
    float64. The input is padded on the right to n_ctx, which causal attention cannot see, so
    one trace serves every length."""
    tokens = np.zeros([1, hp.n_ctx], np.int32)
    tokens[0, :len(toks)] = toks
    return _forward(hp)(params, tf.constant(tokens))[0, len(toks) - 1].numpy().astype(np.float64)


@pytest.fixture
def tiny_sharp(tiny):
    return [model.to_tensors(sharp(tiny, seed=s)) for s in range(3)]


# ---- 1. score: loss, perplexity and bits per byte, windows past n_ctx ----

def first_window(t, n_ctx):
    """Where the window that scores target t begins: windows of n_ctx tokens start at 0,
    n_ctx / 2, n_ctx, ..., and t is scored by the first that holds it at a predicting position
    (t <= begin + n_ctx - 1), the earliest, so with the most context the scheme gives it."""
    stride = n_ctx // 2
    begin = 0 if t <= n_ctx - 1 else -(-(t - n_ctx + 1) // stride) * stride
    assert t - begin >= min(t, n_ctx - stride)       # the docstring's "at least n_ctx / 2"
    return begin


def reference_logprobs(hp, params, ids, context_token, window_of=first_window):
    """log p(ids[i] | what the window scheme shows of the text before it): each window's full
    forward, log-softmax in float64, the targets gathered. The text is ids with context_token
    in front; target t (an index into it) is predicted at position t - begin of its window."""
    text = [int(context_token)] + [int(t) for t in ids]
    windows = {}
    out = np.empty(len(ids), np.float64)
    for t in range(1, len(text)):
        begin = window_of(t, hp.n_ctx)
        if begin not in windows:
            logits, _ = model.forward(hp, params, tf.constant([text[begin:begin + hp.n_ctx]]))
            windows[begin] = log_softmax64(logits[0].numpy())
        out[t - 1] = windows[begin][t - begin - 1, text[t]]
    return out


def no_overlap(t, n_ctx):
    return (t - 1) // (n_ctx - 1) * (n_ctx - 1)


@pytest.mark.parametrize('n', [1, 31, 32, 33, 47, 48, 120])
def test_score_equals_full_forward_log_softmax_over_half_overlapping_windows(tiny, tiny_sharp, n):
    """Per-token log-probabilities against the window scheme rebuilt from full forwards.

    Caught (scoring.score): windows without overlap (stride n_ctx - 1); each token scored by the
    last window that holds it (less context) instead of the first; the first token not
    conditioned on the context token."""
    params = tiny_sharp[0]
    ids = np.random.default_rng(n).integers(0, tiny.n_vocab - 1, n).tolist()
    ctx = sampling.start_token(tiny)
    got = scoring.score(tiny, params, ids, context_token=ctx)
    want = reference_logprobs(tiny, params, ids, ctx)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    if n > tiny.n_ctx:
        # The proof can fail: reading the text in windows without overlap scores differently.
        other = reference_logprobs(tiny, params, ids, ctx, window_of=no_overlap)
        assert np.abs(other - want).max() > 1e-2


def _score_model(tmp_path):
    folder = tmp_path / 'models' / 'toy'
    checkpoint.save_params(sharp(VOCAB_HP, seed=4, scale=8.0), str(folder / 'model.ckpt'),
                           hparams=VOCAB_HP)
    return tmp_path / 'models'


def test_cli_score_loss_perplexity_bits_per_byte(tmp_path, capsys, monkeypatch):
    """sample.py score on a file longer than n_ctx with multi-byte characters: the per-token
    values (--tokens), the mean loss in nats, its exp, and bits per byte = total nats / ln 2 /
    UTF-8 bytes of the text, against full forwards and NumPy.

    Caught: bits per byte over characters instead of bytes (len(text) in sample.py score);
    perplexity as 2 ** loss (scoring.summary); windows without overlap (scoring.score)."""
    import encoder
    models = _score_model(tmp_path)
    text = ('Café au lait — naïve façade, déjà vu: the crème brûlée of 東京. ' * 3).strip()
    path = tmp_path / 'chapter.txt'
    path.write_text(text, encoding='utf-8')
    ids = encoder.get_encoder(None).encode(text)
    assert len(ids) > 2 * VOCAB_HP.n_ctx and len(text.encode('utf-8')) > len(text)
    params = model.to_tensors(checkpoint.load_params(str(models / 'toy'))[0])
    lp = reference_logprobs(VOCAB_HP, params, ids, sampling.EOT_ID)
    loss = -lp.mean()
    bpb = -lp.sum() / math.log(2) / len(text.encode('utf-8'))

    code, out, err = run_sample_py(['score', '--models_dir', str(models), '--model_name', 'toy',
                                    '--file', str(path), '--tokens'], capsys, monkeypatch)
    assert code == 0, err
    lines = out.strip().splitlines()
    per_token = [float(line.split('\t')[0]) for line in lines[:-1]]
    assert len(per_token) == len(ids)
    np.testing.assert_allclose(per_token, lp, atol=1e-4 + 1e-5, rtol=0)
    m = re.search(r': (\d+) tokens, loss ([\d.]+) nats/token, perplexity ([\d.e+]+), '
                  r'([\d.]+) bits/byte', lines[-1])
    assert m, lines[-1]
    assert int(m.group(1)) == len(ids)
    assert abs(float(m.group(2)) - loss) < 1e-4
    assert float(m.group(3)) == pytest.approx(math.exp(loss), rel=1e-4)
    assert abs(float(m.group(4)) - bpb) < 1e-4
    # Bytes and characters differ enough here for the printed value to tell them apart.
    assert abs(-lp.sum() / math.log(2) / len(text) - bpb) > 1e-2


# ---- 2. the palimpsest: keep mode after a swap, and --blend ----

def keep_reference(hp, plan, prompt, length):
    """Greedy tokens of a palimpsest in keep mode, from full forwards over each span.

    `plan` is [(first new-token index, params)]. The checkpoint of a span reads every token it
    feeds (the previous span's last token, then its own) in one forward whose cache holds the
    keys and values that the EARLIER checkpoints computed for the tokens before: the prompt (but
    its last token) is read by the first checkpoint, as is each token a checkpoint writes but
    the last of its span, which the next one reads."""
    P = len(prompt)
    text = list(prompt)
    layers = model.empty_cache(hp, 1, hp.n_ctx)      # the keys/values of the finished spans
    for k, (pos, params) in enumerate(plan):
        end = plan[k + 1][0] if k + 1 < len(plan) else length
        first = 0 if k == 0 else P - 1 + pos           # the first slot this checkpoint writes
        for i in range(pos, end):
            logits, _ = model.forward(hp, params, tf.constant([text[first:P + i]]), cache=layers,
                                      pos=first)
            text.append(int(np.argmax(logits[0, -1].numpy())))
        _, layers = model.forward(hp, params, tf.constant([text[first:P - 1 + end]]),
                                  cache=layers, pos=first)
    return text[P:]


def recompute_reference(hp, plan, prompt, length):
    text = list(prompt)
    for i in range(length):
        params = [p for pos, p in plan if pos <= i][-1]
        text.append(int(np.argmax(full_logits(hp, params, text))))
    return text[len(prompt):]


@pytest.fixture
def three_steps(tiny, tmp_path):
    prefixes = []
    for k, step in enumerate((60, 200, 400)):
        prefixes.append(str(tmp_path / 'run' / f'model-{step}'))
        checkpoint.save_params(sharp(tiny, seed=k), prefixes[-1], hparams=tiny)
    store = palimpsest.Store(tiny)
    return store, prefixes, [store.get(p) for p in prefixes]


def test_keep_mode_tokens_equal_full_forward_over_the_old_checkpoints_keys(tiny, three_steps):
    """After each swap in keep mode, the new checkpoint's greedy tokens equal a full forward of
    it over its own span on top of the keys and values the older checkpoints computed (two swaps,
    so three layers; two ragged prompts in one batch).

    Caught: keep mode rebuilding the cache with the new checkpoint (palimpsest.sample passing
    recompute=True whatever the mode)."""
    store, prefixes, trees = three_steps
    positions = (0, 5, 9)
    prompts, length = [[3, 4, 5], [7]], 14
    out = palimpsest.sample(tiny, list(zip(positions, prefixes)), store,
                            settings.SampleSettings(batch_size=2, length=length, temperature=0,
                                                    top_k=0, top_p=1.0, seed=0),
                            prompts=prompts, cache='keep', jit_compile=True)
    plan = list(zip(positions, trees))
    for prompt, got in zip(prompts, out['tokens']):
        want = keep_reference(tiny, plan, prompt, length)
        assert got == want
        # The proof can fail: re-reading the text with each new checkpoint writes another text.
        assert recompute_reference(tiny, plan, prompt, length) != want


def blend_reference(hp, weighted, prompt, length, *, seed=None):
    """Tokens drawn from the weighted mixture of the checkpoints' softmaxes (full forwards,
    float64): greedy when seed is None, else at temperature 1 with sampling's Gumbel noise."""
    text = list(prompt)
    for step in range(length):
        mix = sum(w * np.exp(log_softmax64(full_logits(hp, p, text))) for p, w in weighted)
        if seed is None:
            text.append(int(np.argmax(mix)))
        else:
            noise = sampling.gumbel_noise(sampling.seed_pair(seed), tf.constant([0]), step,
                                          hp.n_vocab).numpy()[0]
            text.append(int(np.argmax(np.log(mix) + noise)))
    return text[len(prompt):]


def test_blend_equals_argmax_of_the_weighted_mixture_of_softmaxes(tiny, three_steps):
    """--blend greedy (and drawn at temperature 1) against the mixture 0.3 p_A + 0.7 p_B of
    two full forwards' softmaxes.

    Caught: sampling.mix_logits mixing the logits (a weighted geometric mean) instead of the
    probabilities; palimpsest.sample handing the weights over in reverse order."""
    store, prefixes, (a, b, _) = three_steps
    prompt, length = [40, 50, 60, 70], 16
    kw = dict(batch_size=1, length=length, top_k=0, top_p=1.0)
    blend = [(prefixes[0], 0.3), (prefixes[1], 0.7)]
    got = palimpsest.sample(tiny, None, store, settings.SampleSettings(temperature=0, seed=0, **kw),
                            prompts=[prompt], blend=blend)['tokens'][0]
    want = blend_reference(tiny, [(a, 0.3), (b, 0.7)], prompt, length)
    assert got == want
    # The proof can fail: the mixture writes neither checkpoint's text, nor the logit average's,
    # nor the one with the weights the other way round.
    for other in (blend_reference(tiny, [(a, 1.0)], prompt, length),
                  blend_reference(tiny, [(b, 1.0)], prompt, length),
                  blend_reference(tiny, [(a, 0.7), (b, 0.3)], prompt, length),
                  geometric_reference(tiny, [(a, 0.3), (b, 0.7)], prompt, length)):
        assert other != want
    drawn = palimpsest.sample(tiny, None, store,
                              settings.SampleSettings(temperature=1.0, seed=21, **kw),
                              prompts=[prompt], blend=blend)['tokens'][0]
    assert drawn == blend_reference(tiny, [(a, 0.3), (b, 0.7)], prompt, length, seed=21)


def geometric_reference(hp, weighted, prompt, length):
    text = list(prompt)
    for _ in range(length):
        text.append(int(np.argmax(sum(w * full_logits(hp, p, text) for p, w in weighted))))
    return text[len(prompt):]


# ---- 3. top-p against Hugging Face's TopPLogitsWarper ----

def _hf_warpers():
    # transformers is a test dependency (setup.cfg's `test` extra): under CI a missing one fails.
    if IN_CI:
        import torch
        import transformers
    else:
        torch = pytest.importorskip('torch')
        transformers = pytest.importorskip('transformers')
    return torch, transformers


def openai_top_p_keep(row, p):
    """openai/gpt-2's src/sample.py top_p_logits: keep the tokens whose INCLUSIVE cumulative
    probability (descending) is at most p, and at least the most likely one."""
    desc = np.sort(row)[::-1]
    cum = np.cumsum(np.exp(log_softmax64(desc)))
    return row >= desc[max(int((cum <= p).sum()) - 1, 0)]


def _rows(rng, n_vocab):
    """Logit rows of several kinds, many with ties (equal logits), some with a tied maximum."""
    kinds = [
        lambda: rng.normal(0, 2, n_vocab),
        lambda: rng.integers(-3, 4, n_vocab).astype(float),          # ties everywhere
        lambda: np.round(rng.normal(0, 1.5, n_vocab) * 2) / 2,       # ties in half steps
        lambda: np.where(rng.random(n_vocab) < 0.1, 3.0, rng.normal(0, 1, n_vocab)),  # tied top
        lambda: rng.normal(0, 6, n_vocab),                           # peaked
        lambda: np.concatenate([[8.0], rng.integers(0, 3, n_vocab - 1).astype(float)]),
    ]
    return [kinds[i % len(kinds)]() for i in range(240)]


def _p_away_from_sums(rng, row, margin=1e-4):
    # A p that no prefix sum of the sorted probabilities comes within `margin` of, so float32
    # rounding in either implementation cannot move a token across the threshold.
    probs = np.exp(log_softmax64(np.sort(np.asarray(row, np.float32).astype(np.float64))[::-1]))
    sums = np.concatenate([[0.0], np.cumsum(probs)])
    while True:
        p = float(rng.choice([rng.uniform(0.01, 0.99), rng.uniform(0.9, 0.999),
                              rng.uniform(0.01, 0.2)]))
        if np.abs(sums - p).min() > margin:
            return p


@pytest.mark.parametrize('top_k,temperature,jit', [(0, 1.0, False), (0, 1.0, True),
                                                   (0, 0.7, False), (20, 1.3, True)])
def test_top_p_keeps_what_hugging_face_keeps(top_k, temperature, jit):
    """top_p_logits (after temperature and top_k, through filter_logits, the function every draw
    uses, compiled with and without XLA) keeps the tokens that transformers'
    TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper keep, on 240 random rows with
    ties (and -0.0 beside 0.0) and various p.

    Where tied tokens straddle the cut, HF keeps only those of them that its sort happens to put
    last, while top_p_logits keeps every token tied with the least likely one kept (a token is
    kept when the tokens MORE likely than it hold less than p): there the sets differ by exactly
    those tie-mates, and everywhere else they are equal.

    Caught (sampling.top_p_logits): OpenAI's rule (inclusive cumulative probability <= p),
    which keeps one token fewer whenever the cut falls inside the nucleus; the mass above a token
    counted with the token itself (keys >= t instead of keys > t); -0.0 ordered below 0.0 (the
    bug this test found in _order_keys)."""
    torch, transformers = _hf_warpers()
    rng = np.random.default_rng(top_k * 10 + int(temperature * 10))
    n_vocab = 60
    chain = lambda p: [transformers.TemperatureLogitsWarper(temperature)] + (  # noqa: E731
        [transformers.TopKLogitsWarper(top_k)] if top_k else []) + [
        transformers.TopPLogitsWarper(p)]
    rows = _rows(rng, n_vocab)

    @tf.function(jit_compile=jit)
    def keep(row, p):
        return tf.math.is_finite(sampling.filter_logits(
            row[None], temperature=tf.constant(temperature, tf.float32), top_k=top_k,
            top_p=p)[0])
    exact = split = openai_differs = 0
    for row in rows:
        row32 = np.asarray(row, np.float32)
        tempered = row32 / np.float32(temperature)
        if top_k:
            tempered = np.where(tempered < np.sort(tempered)[::-1][top_k - 1], -np.inf, tempered)
        p = _p_away_from_sums(rng, tempered[np.isfinite(tempered)])
        scores = torch.tensor(row32[None])
        for w in chain(p):
            scores = w(None, scores)
        hf = torch.isfinite(scores).numpy()[0]
        ours = keep(tf.constant(row32), tf.constant(p, tf.float32)).numpy()
        cut = tempered[hf].min()
        tie_mates = np.isfinite(tempered) & (tempered == cut)
        assert not (hf & ~ours).any(), (row.tolist(), p)
        np.testing.assert_array_equal(ours, hf | tie_mates, err_msg=f'{row.tolist()} p={p}')
        if (ours == hf).all():
            exact += 1
        else:
            split += 1
        openai_differs += (openai_top_p_keep(tempered, p) != hf).any()
    # Both kinds of row came up, and the rows tell HF's rule from OpenAI's.
    assert exact > 150 and split > 0 and openai_differs > 50, (exact, split, openai_differs)


def test_top_p_is_not_openais_inclusive_rule():
    """probs [0.5, 0.3, 0.2] and p = 0.6: the smallest set reaching 0.6 is {0.5, 0.3} (Holtzman
    et al., nshepperd, HF); openai/gpt-2's sample.py keeps {0.5} alone, since 0.5 + 0.3 > 0.6.

    Caught: OpenAI's rule (inclusive cumulative probability <= p); the mass above a token
    counted with the token itself."""
    torch, transformers = _hf_warpers()
    logits = np.log(np.array([[0.3, 0.5, 0.2]], np.float32))
    hf = torch.isfinite(transformers.TopPLogitsWarper(0.6)(
        None, torch.tensor(logits))).numpy()[0].tolist()
    assert hf == [True, True, False]
    assert openai_top_p_keep(logits[0], 0.6).tolist() == [False, True, False]
    ours = np.isfinite(sampling.top_p_logits(tf.constant(logits), tf.constant(0.6)).numpy()[0])
    assert ours.tolist() == hf


# ---- 4. sample.py: interactive through a pipe, printed seeds (--stop and --prompt_file: in
# tests/test_prompts.py) ----

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """models/toy (save_toy)."""
    return save_toy(tmp_path_factory.mktemp('models'))


def test_cli_interactive_answers_each_prompt_through_a_pipe(models, capsys, monkeypatch):
    """sample.py --interactive with prompts on a pipe: one answer per non-blank prompt, in order,
    each what --prompt gives for that prompt alone (greedy), blank lines refused, exit 0 at EOF.

    Caught: the EOFError at the end of input not caught (a traceback, exit 1); each line
    answered from the --prompt/--prompt_file prompts (none: unconditional) instead of the
    line."""
    argv = ['--length', '6', '--temperature', '0', '--quiet']
    prompts = ['Hello there', 'The night was']
    proc = subprocess.run(
        [sys.executable, 'sample.py', '--models_dir', str(models), '--model_name', 'toy',
         '--xla', 'False', '--interactive', *argv],
        input=f'{prompts[0]}\n\n   \n{prompts[1]}\n', capture_output=True, text=True, cwd=ROOT,
        timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'Traceback' not in proc.stderr
    asked = proc.stdout.split('Model prompt >>> ')
    # Four lines read, then the prompt once more, answered by the end of input.
    assert len(asked) == 6 and asked[0] == '' and asked[-1] == '', proc.stdout
    answers = [a for a in asked if a]
    assert len(answers) == 2 and asked[2] == asked[3] == ''
    assert proc.stderr.count('Prompt should not be empty!') == 2
    for prompt, answer in zip(prompts, answers):
        alone, _ = sampled(models, 'toy', ['--prompt', prompt, *argv], capsys, monkeypatch)
        assert answer == alone


def test_cli_drawn_seed_is_printed_and_reproduces(models, capsys, monkeypatch):
    """Without --seed a seed is drawn and printed; --seed with the printed value gives the same
    samples exactly (and two runs draw different seeds).

    Caught: the printed seed not the one used (seed + 1 printed); a fixed seed instead of a
    drawn one."""
    argv = ['--length', '10', '--nsamples', '2', '--prompt', 'Hello']
    out, err = sampled(models, 'toy', argv, capsys, monkeypatch)
    seed = int(re.search(r'seed (\d+)', err).group(1))
    again, err2 = sampled(models, 'toy', argv + ['--seed', str(seed)], capsys, monkeypatch)
    assert again == out and f'seed {seed}' in err2
    _, err3 = sampled(models, 'toy', argv, capsys, monkeypatch)
    assert int(re.search(r'seed (\d+)', err3).group(1)) != seed


def test_cli_palimpsest_drawn_seed_is_printed_and_reproduces(tmp_path, capsys, monkeypatch):
    """sample.py palimpsest without --seed prints the seed it drew (and names the file with it);
    --seed with that value writes the same text.

    Caught: the printed seed not the one used (seed + 1 printed)."""
    folder = tmp_path / 'checkpoint' / 'r'
    for k, step in enumerate((60, 200)):
        checkpoint.save_params(sharp(VOCAB_HP, seed=k), str(folder / f'model-{step}'),
                               hparams=VOCAB_HP)
    argv = ['palimpsest', '--checkpoint_dir', str(tmp_path / 'checkpoint'), '--run_name', 'r',
            '--schedule', '0:60,4:200', '--length', '10', '--samples_dir', str(tmp_path / 's'),
            '--xla', 'False']
    code, out, err = run_sample_py(argv, capsys, monkeypatch)
    assert code == 0, err
    seed = int(re.search(r'\(seed (\d+)\)', err).group(1))
    assert [f'seed{seed}' in n for n in os.listdir(tmp_path / 's')] == [True, True]
    code, again, err = run_sample_py(argv + ['--seed', str(seed)], capsys, monkeypatch)
    assert code == 0 and again == out
