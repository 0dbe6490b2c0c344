"""Sampling: filters on hand-made logits, decode against full-forward oracles, sample.py."""
import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint, fast, model, sampling, settings
from gpt2.errors import UserError
from tests.conftest import run_sample_py


@pytest.fixture
def params(tiny):
    return model.to_tensors(model.init_params(tiny, seed=1))


def full_logits(hp, params, toks):
    logits, _ = model.forward(hp, params, tf.constant([toks], tf.int32))
    return logits[0, -1].numpy()


# ---- filters ----

@pytest.fixture(params=['sort-free', 'sorted'])
def filters(request):
    """Each filter test runs on fast.py's sort-free twins and on sampling.py's plain filters,
    which sort."""
    with fast.plain(request.param == 'sorted'):
        yield request.param


def test_top_k_keeps_k_largest(filters):
    logits = tf.constant([[1.0, 5.0, 3.0, -2.0, 4.0]])
    out = sampling.top_k_logits(logits, 2).numpy()[0]
    assert np.isfinite(out).tolist() == [False, True, False, False, True]
    assert sampling.top_k_logits(logits, 0).numpy().tolist() == logits.numpy().tolist()


def test_top_p_keeps_smallest_set_reaching_p(filters):
    probs = np.array([[0.5, 0.05, 0.3, 0.15]])
    logits = tf.constant(np.log(probs), tf.float32)
    keep = lambda p, k=0: np.isfinite(sampling.top_p_logits(  # noqa: E731
        logits if not k else sampling.top_k_logits(logits, k), p).numpy()[0]).tolist()
    assert keep(0.5) == [True, False, False, False]       # the top token alone reaches 0.5
    assert keep(0.51) == [True, False, True, False]
    assert keep(0.81) == [True, False, True, True]
    assert keep(1.0) == [True, True, True, True]
    assert keep(0.01) == [True, False, False, False]      # the most likely is always kept
    # With top_k, top_p reads the renormalised top-k distribution: 0.5/0.8 = 0.625 alone.
    assert keep(0.6, k=2) == [True, False, False, False]
    assert keep(0.7, k=2) == [True, False, True, False]


@pytest.mark.parametrize('jit', [False, True])
def test_filters_take_minus_zero_and_zero_as_a_tie(jit, filters):
    """-0.0 and 0.0 are one logit: top-k keeps both when they tie with the k-th, top-p keeps both
    when either is kept. (Ordered by their bits, -0.0 sorted below 0.0 and was dropped.)"""
    logits = tf.constant([[1.0, 0.0, -0.0, -1.0], [-0.0, 0.0, -5.0, -5.0]])

    @tf.function(jit_compile=jit)
    def keep(k, p):
        return (tf.math.is_finite(sampling.top_k_logits(logits, k)),
                tf.math.is_finite(sampling.top_p_logits(logits, p)))
    by_k, by_p = keep(2, tf.constant(0.4))
    assert by_k.numpy().tolist() == [[True, True, True, False], [True, True, False, False]]
    # Row 0: 0.534 above the zeros, so p = 0.4 keeps 1.0 alone; row 1: the zeros lead, both kept.
    assert by_p.numpy().tolist() == [[True, False, False, False], [True, True, False, False]]
    _, by_p = keep(2, tf.constant(0.6))
    assert by_p.numpy()[0].tolist() == [True, True, True, False]


def _reference_filters(logits, k, p):
    # Sorting, as the filters are defined: the k-th largest value, then the descending cumulative
    # probabilities of what is left (exclusive) below p, at least one token.
    out = []
    for row in logits.astype(np.float64):
        if k:
            row = np.where(row < np.sort(row)[::-1][k - 1], -np.inf, row)
        desc = np.sort(row)[::-1]
        probs = np.exp(desc - desc[0])
        probs /= probs.sum()
        n_keep = max(1, int((np.cumsum(probs) - probs < p).sum()))
        out.append(np.isfinite(np.where(row < desc[n_keep - 1], -np.inf, row)))
    return np.array(out)


@pytest.mark.parametrize('jit', [False, True])
def test_filters_match_sorting_reference(jit, filters):
    """Both filters against a NumPy sort on rows with ties, negative, tiny and huge values."""
    rng = np.random.default_rng(0)
    rows = [rng.normal(0, 3, 97), rng.integers(-3, 3, 97).astype(float),
            -np.abs(rng.normal(0, 1e-3, 97)), rng.normal(0, 1, 97) * 1e4,
            np.concatenate([[50.0], rng.normal(0, 1, 96)])]
    logits = tf.constant(np.array(rows), tf.float32)

    @tf.function(jit_compile=jit)
    def keep(k, p):
        return tf.math.is_finite(sampling.top_p_logits(sampling.top_k_logits(logits, k), p))
    for k in (0, 1, 5, 40, 96):
        for p in (0.05, 0.3, 0.9, 0.999, 1.0):
            want = _reference_filters(logits.numpy(), k, p)
            np.testing.assert_array_equal(keep(k, tf.constant(p)).numpy(), want,
                                          err_msg=f'k={k} p={p}')


def test_repetition_penalty_ctrl_rule_negative_logits():
    logits = tf.constant([[2.0, -2.0, 1.0, -1.0]])
    seen = tf.constant([[True, True, False, False]])
    out = sampling.apply_penalty(logits, seen, 2.0).numpy()[0]
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]    # both seen tokens become less likely


def test_filter_order_temperature_then_top_k_then_top_p(filters):
    logits = tf.constant([[2.0, 1.0, 0.0, -1.0]])
    out = sampling.filter_logits(logits, temperature=tf.constant(0.5), top_k=3,
                                 top_p=tf.constant(0.9)).numpy()[0]
    # Tempered top-3 probabilities are [0.867, 0.117, 0.016]: top_p 0.9 keeps two.
    assert np.isfinite(out).tolist() == [True, True, False, False]
    assert np.allclose(out[:2], [4.0, 2.0])


def test_mixture_probabilities_equal_weighted_mixture():
    a = tf.constant([[1.0, 2.0, 0.5]])
    b = tf.constant([[-1.0, 0.0, 3.0]])
    mixed = sampling.mix_logits([a, b], tf.constant([0.3, 0.7]))
    want = 0.3 * tf.nn.softmax(a) + 0.7 * tf.nn.softmax(b)
    assert np.allclose(tf.nn.softmax(mixed).numpy(), want.numpy(), atol=1e-6)
    one = sampling.mix_logits([a, b], tf.constant([1.0, 0.0]))
    assert np.allclose(tf.nn.softmax(one).numpy(), tf.nn.softmax(a).numpy(), atol=1e-6)


def test_draws_follow_the_filtered_distribution_chi_square():
    n, vocab = 20000, 8
    logits = tf.constant(np.log([[0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02]]), tf.float32)
    rows = tf.range(n)
    noise = sampling.gumbel_noise(np.array([7, 0], np.uint32), rows, 3, vocab)
    t, k = 0.8, 5
    toks = sampling.draw(tf.tile(logits, [n, 1]), temperature=tf.constant(t), top_k=k,
                         top_p=None, noise=noise).numpy()
    p = np.exp(logits.numpy()[0] / t)
    p[k:] = 0
    p /= p.sum()
    counts = np.bincount(toks, minlength=vocab)
    assert counts[k:].sum() == 0                          # filtered tokens are never drawn
    chi2 = (((counts[:k] - n * p[:k]) ** 2) / (n * p[:k])).sum()
    assert chi2 < 18.47                                   # df=4, p=0.001


def test_noise_is_keyed_on_seed_row_and_step():
    g = lambda s, r, st: sampling.gumbel_noise(  # noqa: E731
        sampling.seed_pair(s), tf.constant(r), st, 50).numpy()
    assert np.allclose(g(1, [0, 1], 0)[1], g(1, [1], 0)[0], rtol=1e-6)  # vector log: 1 ulp
    assert not np.array_equal(g(1, [0], 0), g(2, [0], 0))
    assert not np.array_equal(g(1, [0], 0), g(1, [0], 1))
    assert not np.array_equal(g(1, [0], 0), g(1, [1], 0))


# ---- decoding against the full forward ----

@pytest.mark.parametrize('jit', [False, True])
def test_greedy_equals_argmax_of_full_forward(tiny, params, jit):
    prompts = [[1, 2, 3, 4], [5]]
    out = sampling.generate(tiny, params, prompts=prompts, nsamples=2, batch_size=2, length=12,
                            temperature=0, jit_compile=jit)
    for prompt, new in zip(prompts, out):
        toks = list(prompt)
        for _ in range(12):
            toks.append(int(np.argmax(full_logits(tiny, params, toks))))
        assert new == toks[len(prompt):]


def test_sampling_with_cache_equals_full_recompute(tiny, params):
    """Cache on equals cache off: the same draws as recomputing the whole text every step."""
    seed, k, t, top_p = 11, 20, 0.9, 0.8
    out = sampling.generate(tiny, params, prompts=[[3, 1]], length=10, temperature=t, top_k=k,
                            top_p=top_p, seed=seed, repetition_penalty=1.3)
    toks = [3, 1]
    for step in range(10):
        logits = tf.constant(full_logits(tiny, params, toks)[None])
        seen = np.zeros([1, tiny.n_vocab], bool)
        seen[0, toks] = True
        logits = sampling.apply_penalty(logits, tf.constant(seen), 1.3)
        noise = sampling.gumbel_noise(sampling.seed_pair(seed), tf.constant([0]), step,
                                      tiny.n_vocab)
        tok = sampling.draw(logits, temperature=tf.constant(t), top_k=k,
                            top_p=tf.constant(top_p), noise=noise)
        toks.append(int(tok[0]))
    assert out[0] == toks[2:]


def test_seeded_runs_reproduce_whatever_the_batch(tiny, params):
    a = sampling.generate(tiny, params, nsamples=3, batch_size=1, length=8, seed=5)
    b = sampling.generate(tiny, params, nsamples=3, batch_size=2, length=8, seed=5,
                          jit_compile=True)
    c = sampling.generate(tiny, params, nsamples=3, batch_size=3, length=8, seed=6)
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) == 3               # samples differ from one another


def test_ragged_prompts_in_one_batch_equal_each_alone(tiny, params):
    prompts = [[4, 5, 6, 7, 8, 9], [10], [11, 12, 13]]
    together = sampling.generate(tiny, params, prompts=prompts, nsamples=3, batch_size=3,
                                 length=10, seed=3, temperature=1.0)
    for i, p in enumerate(prompts):
        # Sample i keys its noise on i: the full-forward oracle draws with row id i.
        assert together[i] == _alone_as_row(tiny, params, p, row=i, seed=3, length=10)
    alone = sampling.generate(tiny, params, prompts=prompts[:1], length=10, seed=3)
    assert together[0] == alone[0]


def _alone_as_row(hp, params, prompt, *, row, seed, length):
    toks = list(prompt)
    for step in range(length):
        logits = tf.constant(full_logits(hp, params, toks)[None])
        noise = sampling.gumbel_noise(sampling.seed_pair(seed), tf.constant([row]), step,
                                      hp.n_vocab)
        toks.append(int(sampling.draw(logits, temperature=tf.constant(1.0), top_k=0, top_p=None,
                                      noise=noise)[0]))
    return toks[len(prompt):]


def test_sliding_window_past_n_ctx(tiny, params):
    """Past n_ctx the model re-reads the last SLIDE_KEEP of n_ctx; every position stays valid."""
    length = 3 * tiny.n_ctx
    out = sampling.generate(tiny, params, prompts=[[1, 2]], length=length, temperature=0)[0]
    keep = int(tiny.n_ctx * sampling.SLIDE_KEEP)
    toks, s = [1, 2], 0
    for _ in range(length):
        if len(toks) - 1 - s == tiny.n_ctx:             # the cache is full: slide
            s = len(toks) - keep
        toks.append(int(np.argmax(full_logits(tiny, params, toks[s:]))))
    assert out == toks[2:]


def test_long_prompt_slides_too(tiny, params):
    prompt = list(range(1, 41))                            # longer than n_ctx=32
    out = sampling.generate(tiny, params, prompts=[prompt], length=3, temperature=0)[0]
    keep = prompt[-int(tiny.n_ctx * sampling.SLIDE_KEEP):]
    assert out[0] == int(np.argmax(full_logits(tiny, params, keep)))


def test_stop_tokens_end_their_row_only(tiny, params):
    prompts = [[1, 2, 3], [40, 41]]
    free = sampling.generate(tiny, params, prompts=prompts, nsamples=2, batch_size=2, length=12,
                             temperature=0)
    stop = next(t for t in free[0] if t not in free[1])
    k = free[0].index(stop)
    out = sampling.generate(tiny, params, prompts=prompts, nsamples=2, batch_size=2, length=12,
                            temperature=0, stop_ids=[stop])
    assert out[0] == free[0][:k]
    assert out[1] == free[1]


def test_stop_strings_end_the_right_rows(tiny, params):
    decode = lambda ids: ''.join(chr(0x100 + t) for t in ids)  # noqa: E731  one char per id
    prompts = [[1, 2, 3], [40, 41]]
    spans = [sampling.Span.fixed(params)]
    s = settings.SampleSettings(batch_size=2, length=40, temperature=0, seed=0)
    kw = dict(prompts=prompts, decode_text=decode, chunk=4)
    free = sampling.run_spans(tiny, spans, s, **kw)
    row0, row1 = free['tokens']
    pair = next(decode(row0[i:i + 2]) for i in range(len(row0) - 1)
                if decode(row0[i:i + 2]) not in decode(row1))
    out = sampling.run_spans(tiny, spans, s, stop_strings=[pair], **kw)
    cut = decode(row0).index(pair)
    assert out['texts'][0] == decode(row0)[:cut]
    assert out['tokens'][0] == row0[:cut]
    assert out['tokens'][1] == row1 and out['texts'][1] == decode(row1)


def test_bad_controls_are_user_errors(tiny, params):
    for kw in ({'top_p': 0}, {'top_p': 1.5}, {'temperature': -1}, {'length': -1},
               {'top_k': -2}, {'nsamples': 0}):
        with pytest.raises(UserError):
            sampling.generate(tiny, params, **kw)
    with pytest.raises(UserError, match='2 prompts'):
        sampling.generate(tiny, params, prompts=[[1], [2]], nsamples=1)
    with pytest.raises(UserError, match='outside the vocabulary'):
        sampling.generate(tiny, params, prompts=[[500]])


def test_variables_and_numpy_trees_both_work(tiny):
    tree = model.init_params(tiny, seed=2)
    variables = tf.nest.map_structure(tf.Variable, tree)
    a = sampling.generate(tiny, tree, length=5, seed=1)
    b = sampling.generate(tiny, variables, length=5, seed=1)
    assert a == b


# ---- sample.py ----

@pytest.fixture
def model_dir(tmp_path):
    """A 1-layer model with GPT-2's vocabulary, saved like a downloaded one."""
    from gpt2 import hparams as hparams_lib
    hp = hparams_lib.HParams(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=1)
    folder = tmp_path / 'models' / 'toy'
    checkpoint.save_params(model.init_params(hp, seed=0), str(folder / 'model.ckpt'), hparams=hp)
    return tmp_path


def _run(argv, capsys, monkeypatch):
    return run_sample_py(argv, capsys, monkeypatch)


def test_cli_samples_reproducibly_and_writes_output(model_dir, capsys, monkeypatch):
    base = ['--models_dir', str(model_dir / 'models'), '--model_name', 'toy', '--length', '6',
            '--seed', '3', '--nsamples', '2', '--prompt', 'Hello', '--xla', 'False']
    code, out1, _ = _run(base + ['--output', str(model_dir / 'o.txt')], capsys, monkeypatch)
    assert code == 0 and 'SAMPLE 2' in out1
    code, out2, _ = _run(base, capsys, monkeypatch)
    assert out1 == out2
    assert (model_dir / 'o.txt').read_text().count('SAMPLE') == 2


def test_cli_bad_input_is_one_line(model_dir, capsys, monkeypatch):
    for argv, want in ((['--top_p', '2'], 'top_p'), (['--temperature', '-1'], 'temperature'),
                       (['--prompt_file', 'nope.txt'], 'does not exist'),
                       (['--checkpoint', str(model_dir)], 'no checkpoint')):
        code, _, err = _run(['--models_dir', str(model_dir / 'models'), '--model_name', 'toy']
                            + argv if '--checkpoint' not in argv else argv, capsys, monkeypatch)
        assert code == 1 and want in err and len(err.strip().splitlines()) == 1, err


def test_cli_score(model_dir, capsys, monkeypatch):
    code, out, _ = _run(['score', '--models_dir', str(model_dir / 'models'), '--model_name',
                         'toy', '--text', 'a b c d e f g h i j k l m n o p q r s t u v w x y z '
                         'and more words to pass the context window of thirty two tokens'],
                        capsys, monkeypatch)
    assert code == 0 and 'perplexity' in out


def test_cli_subcommands_take_the_flags_they_always_took():
    """fire parses each entry's signature: its own flags and the SampleSettings fields it takes,
    with their defaults (the atlas's nsamples and batch_size its own)."""
    import inspect

    import sample
    shared = ['prompt', 'prompt_file', 'nsamples', 'batch_size', 'length', 'temperature', 'top_k',
              'top_p', 'repetition_penalty', 'seed', 'stop', 'include_prompt', 'output', 'quiet',
              'xla', 'dtype']
    source = ['model_name', 'run_name', 'checkpoint', 'models_dir', 'checkpoint_dir']
    want = {
        'sample': shared + source + ['interactive', 'novel_against', 'novel_mode', 'ngram'],
        'score': source + ['file', 'text', 'tokens', 'dtype'],
        'palimpsest': shared + ['run_name', 'checkpoint_dir', 'samples_dir', 'schedule', 'cycle',
                                'steps', 'every', 'blend', 'cache', 'annotate', 'budget_mb'],
        'novelty': ['corpus', 'samples', 'mode', 'ngram', 'output', 'delimiter'],
        'atlas': ['run_name', 'steps', 'temperatures', 'prompt', 'prompt_file', 'nsamples',
                  'length', 'seed', 'corpus', 'output', 'checkpoint_dir', 'samples_dir', 'top_k',
                  'top_p', 'ngram', 'every', 'batch_size', 'dtype', 'xla', 'quiet']}
    entries = dict(sample.COMMANDS, sample=sample.sample)
    for name, flags in want.items():
        got = inspect.signature(entries[name]).parameters
        assert sorted(got) == sorted(flags), name
    atlas = inspect.signature(sample.atlas).parameters
    assert (atlas['nsamples'].default, atlas['batch_size'].default) == (2, None)
    assert inspect.signature(sample.sample).parameters['length'].default == 100


def test_cli_first_flags_come_by_position_as_they_always_did(model_dir, capsys, monkeypatch,
                                                             tmp_path):
    """`sample.py 'A prompt'`, `score FILE`, `palimpsest SCHEDULE`, `atlas RUN`: a positional
    argument is the flag it was before the flags came from SampleSettings."""
    import inspect

    import sample
    entries = dict(sample.COMMANDS, sample=sample.sample)
    for name, first in (('sample', ['prompt', 'prompt_file', 'interactive']),
                        ('score', ['file', 'text']), ('palimpsest', ['schedule', 'cycle', 'steps']),
                        ('atlas', ['run_name', 'steps', 'temperatures']),
                        ('novelty', ['corpus', 'samples'])):
        bound = inspect.signature(entries[name]).bind(*first).arguments
        assert list(bound.items()) == [(f, f) for f in first], name
    text = tmp_path / 'notes.txt'
    text.write_text('a b c d e f g')
    by_flag = _run(['score', '--file', str(text), '--models_dir', str(model_dir / 'models'),
                    '--model_name', 'toy'], capsys, monkeypatch)
    by_position = _run(['score', str(text), '--models_dir', str(model_dir / 'models'),
                        '--model_name', 'toy'], capsys, monkeypatch)
    assert by_position[0] == 0 and by_position[1] == by_flag[1] and 'perplexity' in by_flag[1]
