"""The novelty filter: constructed copied / new lines in both modes, hand-computed rates, a naive
tuple-set oracle for the hashed index, .npz corpora equal to text, and one-line errors."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import encoder as encoder_lib
from gpt2 import novelty, samples_file
from gpt2.errors import UserError

ENC = encoder_lib.get_encoder()
D = samples_file.SAMPLE_DELIMITER

CORPUS = '''Nothing to be done.
The sun shone, having no alternative, on the nothing new.
Murphy sat out of it, as though he were free, in a mew
in West Brompton.

I can't go on, I'll go on.
'''

# Each sample line and whether it is copied from CORPUS at the default n-gram length (8).
SAMPLE = [
    ('Nothing to be done.', True),  # verbatim line
    ('  nothing   TO be\tDone. ', True),  # the same line, other spacing and case
    ('He sat out of it, as though he were free, and wept.', True),  # an 11-token run
    ('The nothing new shone on Murphy in the mew.', False),  # corpus words, no long run
    (D, False),  # delimiter: kept, not counted
    ('', False),  # blank: kept, not counted
    ('Murphy sat out of it, as though he were free, in a mew in West Brompton.', True),  # unwrapped
    ('Nothing to be done today.', False),  # not the whole line, and 6 tokens < 8
    ('I can go on.', False),
]


def write(path, text):
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return write(tmp_path / 'corpus.txt', CORPUS)


def sample_text(lines=SAMPLE):
    return ''.join(line + '\n' for line, _ in lines)


def test_normalise():
    assert novelty.normalise('  Nothing \t TO  be\u00a0done.\n') == 'nothing to be done.'
    assert novelty.normalise('STRASSE') == novelty.normalise('straße')  # casefold, not lower
    assert novelty.normalise(' \t ') == ''


def test_drop_removes_exactly_the_copied_lines(corpus):
    kept, report = novelty.Filter(corpus, mode='drop').check(sample_text())
    assert kept == ''.join(line + '\n' for line, copied in SAMPLE if not copied)
    assert (report.lines, report.copied_lines) == (7, 4)


def test_mark_prefixes_exactly_the_copied_lines(corpus):
    kept, report = novelty.Filter(corpus, mode='mark').check(sample_text())
    assert kept == ''.join((novelty.MARKER if copied else '') + line + '\n'
                           for line, copied in SAMPLE)
    assert kept.count(novelty.MARKER) == 4


def test_ngram_length_is_exact(corpus):
    line = 'He sat out of it, as though he were free, and wept.'
    shared = ' sat out of it, as though he were free,'
    assert len(ENC.encode(shared)) == 11  # the longest run this line shares with the corpus
    for n, copied in [(8, True), (11, True), (12, False)]:
        kept, _ = novelty.Filter(corpus, ngram=n).check(line + '\n')
        assert kept == ('' if copied else line + '\n'), n


def test_rates_hand_computed(tmp_path):
    corpus = write(tmp_path / 'c.txt', 'a b c d e\n')  # one token per letter: ' a', ' b', ...
    text = f'a b c x y\n{D}\n\np q r\n'
    kept, report = novelty.Filter(corpus, ngram=3).check(text)
    # line 1: (a b c) found, (b c x) and (c x y) not; line 2: (p q r) not found.
    assert report.to_dict() == {'ngram': 3, 'lines': 2, 'copied_lines': 1, 'line_share': 0.5,
                                'ngrams': 4, 'copied_ngrams': 1, 'ngram_share': 0.25}
    assert kept == f'{D}\n\np q r\n'
    assert str(report) == ('copied lines: 1 of 2 (50.0%); 3-token n-grams found in the corpus: '
                           '1 of 4 (25.0%)')


def test_no_ngrams_is_not_a_rate_of_zero(tmp_path):
    corpus = write(tmp_path / 'c.txt', 'a b c d e\n')
    _, report = novelty.Filter(corpus, ngram=8).check('a b c\n')
    assert (report.ngrams, report.ngram_share, report.line_share) == (0, None, 0.0)
    _, report = novelty.Filter(corpus, ngram=8).check(f'{D}\n\n')
    assert report.line_share is None and 'n/a' in str(report)


def test_ngrams_stay_inside_a_generated_line_but_span_corpus_lines(tmp_path):
    wrapped = write(tmp_path / 'c.txt', 'a b\nc d\n')
    filt = novelty.Filter(wrapped, ngram=3)
    assert filt.check('a b c d\n')[1].copied_ngrams == 2  # (a b c), (b c d) across the wrap
    assert filt.check('x a\nb c\n') == ('x a\nb c\n', novelty.Report(3, lines=2))  # no 3-gram


def test_documents_do_not_join(tmp_path):
    joined = novelty.Filter(write(tmp_path / 'a.txt', 'a b\nc d\n'), ngram=3)
    split = novelty.Filter(write(tmp_path / 'b.txt', f'a b\n{encoder_lib.EOT}\nc d\n'), ngram=3)
    files = novelty.Filter([write(tmp_path / 'c1.txt', 'a b\n'), write(tmp_path / 'c2.txt', 'c d')],
                           ngram=3)
    assert joined.check('a b c d\n')[0] == ''
    assert split.check('a b c d\n')[0] == 'a b c d\n'
    assert files.check('a b c d\n')[0] == 'a b c d\n'


def test_line_ends_and_total(corpus):
    filt = novelty.Filter(corpus, mode='mark')
    kept, _ = filt.check('Nothing to be done.\r\nnew words\r\nI can\'t go on, I\'ll go on.')
    assert kept == ('[copied] Nothing to be done.\r\nnew words\r\n'
                    '[copied] I can\'t go on, I\'ll go on.')
    filt.check(sample_text())
    assert (filt.total.lines, filt.total.copied_lines) == (3 + 7, 2 + 4)


def test_npz_corpus_equals_text(tmp_path):
    docs = [CORPUS, 'a b\nc d\n', 'x y z\n']
    text = write(tmp_path / 'three.txt', encoder_lib.EOT.join(docs))
    # Two chunks, as encode.py writes them: the second holds two documents joined by the EOT id.
    npz = str(tmp_path / 'three.npz')
    np.savez(npz, np.array(ENC.encode(docs[0]), np.int32),
             np.array(ENC.encode(docs[1] + encoder_lib.EOT + docs[2], allowed_special='all'),
                      np.int32))
    probe = sample_text() + 'a b c d\nb c d x\n'
    for n in (3, 8):
        a, b = novelty.Index(text, ngram=n), novelty.Index(npz, ngram=n)
        np.testing.assert_array_equal(a.lines, b.lines)
        np.testing.assert_array_equal(a.grams, b.grams)
        assert novelty.Filter(a).check(probe) == novelty.Filter(b).check(probe)
    assert novelty.Filter(npz, ngram=3).check('a b c d\nd x y\n') == ('d x y\n', novelty.Report(
        3, lines=2, copied_lines=1, ngrams=3, copied_ngrams=2))


def test_folders_and_globs(tmp_path, corpus):
    os.makedirs(tmp_path / 'sub')
    write(tmp_path / 'sub' / 'more.txt', 'Entirely different words here.\n')
    for paths in [str(tmp_path), str(tmp_path / '*.txt') + ',' + str(tmp_path / 'sub'),
                  [str(tmp_path / 'corpus.txt'), str(tmp_path / 'sub' / 'more.txt')]]:
        kept, _ = novelty.Filter(paths).check('Nothing to be done.\nentirely  different words '
                                              'HERE.\nnew\n')
        assert kept == 'new\n'


def test_split_paths(tmp_path):
    assert novelty.split_paths('a.txt,data/,') == ['a.txt', 'data/']
    assert novelty.split_paths(['a,b.txt']) == ['a,b.txt']
    comma = write(tmp_path / 'a,b.txt', 'x')
    assert novelty.split_paths(comma) == comma


def test_flushing_long_documents_loses_no_window(tmp_path, monkeypatch):
    path = write(tmp_path / 'c.txt', open(__file__, encoding='utf-8').read())
    whole = novelty.Index(path, ngram=5)
    monkeypatch.setattr(novelty, '_FLUSH', 7)
    cut = novelty.Index(path, ngram=5)
    np.testing.assert_array_equal(whole.grams, cut.grams)
    assert whole.tokens == cut.tokens


def test_hashes_are_a_function_of_the_window():
    t = np.array([5, 1, 2, 3, 5, 1, 2, 3, 50256, 0])
    h = novelty.ngram_hashes(t, 4)
    assert h.dtype == np.uint64 and len(h) == 7
    assert h[0] == h[4] and len(set(h.tolist())) == 6
    assert len(novelty.ngram_hashes(t[:3], 4)) == 0
    assert novelty.ngram_hashes([1, 2], 2)[0] != novelty.ngram_hashes([2, 1], 2)[0]


WORDS = ['a', 'b', 'The', 'the', 'dog', 'cat,', ' ', '  ', '\t', 'x', 'é']


def naive(corpus_docs, text, n):
    """Oracle: token tuples in a Python set, the rules written out directly."""
    lines, grams = set(), set()
    for doc in corpus_docs:
        norms = [novelty.normalise(line) for line in doc.splitlines()]
        lines.update(x for x in norms if x)
        toks = ENC.encode(''.join(' ' + x for x in norms if x))
        grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    out, counts = [], [0, 0, 0, 0]
    for line in text.splitlines():
        norm = novelty.normalise(line)
        if not norm or line == D:
            out.append(False)
            continue
        toks = ENC.encode(' ' + norm)
        mine = [tuple(toks[i:i + n]) in grams for i in range(len(toks) - n + 1)]
        copied = norm in lines or any(mine)
        out.append(copied)
        counts = [counts[0] + 1, counts[1] + copied, counts[2] + len(mine), counts[3] + sum(mine)]
    return out, counts


line_st = st.lists(st.sampled_from(WORDS), max_size=8).map(' '.join)
doc_st = st.lists(line_st, min_size=1, max_size=8).map('\n'.join)


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(doc_st, min_size=1, max_size=3), text=st.lists(line_st, max_size=10),
       n=st.integers(1, 5))
def test_matches_naive_oracle(tmp_path_factory, docs, text, n):
    if not any(novelty.normalise(d) for d in docs):
        return
    folder = tmp_path_factory.mktemp('c')
    path = write(folder / 'c.txt', encoder_lib.EOT.join(docs))
    text = '\n'.join(text)
    copied, report = novelty.Filter(path, ngram=n).copied(text.splitlines())
    want, counts = naive(docs, text, n)
    assert copied.tolist() == want
    assert [report.lines, report.copied_lines, report.ngrams, report.copied_ngrams] == counts


def test_run_writes_atomically_and_reports(tmp_path, corpus, capsys):
    samples = write(tmp_path / 'samples.txt', sample_text())
    out = str(tmp_path / 'out' / 'kept.txt')
    report = novelty.run([corpus], samples, output=out)
    captured = capsys.readouterr()
    assert captured.out == ''
    assert 'copied lines: 4 of 7 (57.1%)' in captured.err and out in captured.err
    assert report['copied_lines'] == 4 and report['lines'] == 7
    with open(out, encoding='utf-8') as f:
        assert f.read() == ''.join(line + '\n' for line, copied in SAMPLE if not copied)
    assert os.listdir(tmp_path / 'out') == ['kept.txt']


def test_run_to_stdout_and_in_place(tmp_path, corpus, capsys):
    samples = write(tmp_path / 'samples.txt', sample_text())
    novelty.run(corpus, samples, mode='mark', ngram=12)
    captured = capsys.readouterr()
    assert captured.out.count(novelty.MARKER) == 3 and 'marked 3 lines -> stdout' in captured.err
    novelty.run(corpus, samples, output=samples)
    with open(samples, encoding='utf-8') as f:
        assert novelty.MARKER not in f.read()
    assert sorted(os.listdir(tmp_path)) == ['corpus.txt', 'samples.txt']


@pytest.mark.parametrize('kwargs, words', [
    ({'corpus': 'missing/*.txt'}, 'no such file'),
    ({'samples': 'missing.txt'}, 'samples file missing.txt is not found'),
    ({'samples': '.'}, 'is a folder'),
    ({'ngram': 0}, '>= 1, got 0'),
    ({'ngram': -3}, 'got -3'),
    ({'ngram': '8'}, "got '8'"),
    ({'ngram': 2.5}, 'got 2.5'),
    ({'mode': 'delete'}, "unknown --mode 'delete'"),
    ({'output': True}, '--output needs a file name, got True'),
    ({'corpus': 'blank.txt'}, 'has no text'),
    ({'corpus': 'latin1.txt'}, 'not UTF-8'),
    ({'samples': 'latin1.txt'}, 'samples file latin1.txt is not UTF-8'),
    ({'corpus': 'bad.npz'}, 'not a readable .npz'),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, kwargs, words):
    monkeypatch.chdir(tmp_path)
    write('corpus.txt', CORPUS)
    write('samples.txt', sample_text())
    write('blank.txt', '\n  \n\t\n')
    write('bad.npz', 'not a zip')
    with open('latin1.txt', 'wb') as f:
        f.write('caf\u00e9\n'.encode('latin-1'))
    args = {'corpus': 'corpus.txt', 'samples': 'samples.txt', 'output': 'out.txt', **kwargs}
    with pytest.raises(UserError) as e:
        novelty.run(args.pop('corpus'), args.pop('samples'), **args)
    assert words in str(e.value) and '\n' not in str(e.value)
    assert not os.path.exists('out.txt')


def test_empty_npz_corpus_and_ngram_mismatch(tmp_path, corpus):
    npz = str(tmp_path / 'empty.npz')
    np.savez(npz, np.zeros(0, np.int32))
    with pytest.raises(UserError, match='has no text'):
        novelty.Index(npz)
    index = novelty.Index(corpus, ngram=5)
    assert novelty.Filter(index, ngram=5).index is index
    with pytest.raises(UserError, match='differs from the index'):
        novelty.Filter(index, ngram=6)


@pytest.mark.slow
def test_sample_py_novel_against_drops_lines_found_in_the_corpus(tmp_path):
    """Same seed twice: the second run, checked against the first run's text, drops every line."""
    import subprocess
    import sys

    from gpt2 import checkpoint, hparams, model
    from tests.conftest import ROOT
    hp = hparams.HParams(n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    checkpoint.save_params(model.init_params(hp, 1), str(tmp_path / 'run' / 'model-1'), hparams=hp)
    base = [sys.executable, 'sample.py', '--checkpoint', str(tmp_path / 'run'), '--length', '24',
            '--nsamples', '2', '--seed', '5', '--quiet']
    first = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (tmp_path / 'corpus.txt').write_text(first.stdout, encoding='utf-8')
    second = subprocess.run(base + ['--novel_against', str(tmp_path / 'corpus.txt'),
                                    '--novel_mode', 'drop'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert first.stdout.strip() and not second.stdout.strip()
    assert 'copied lines: 2 of 2' in second.stderr
