"""encoder/: OpenAI's token ids, checked against tiktoken built from the same vocabulary files."""
import hashlib
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import encoder
from tests.conftest import SHARED, corpus_files

import tiktoken  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402

HERE = os.path.dirname(encoder.__file__)
# GPT-2's pattern as tiktoken writes it (equivalent to OpenAI's encoder.py pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

EDGE_CASES = [
    '', ' ', '  ', '\n', '\n\n\n', ' \n \n', 'a  b   c    d', 'trailing spaces   ', '\t\ttabs\t',
    'Crème brûlée, naïve façade, Ångström', '北京欢迎你。東京タワー', '한국어 텍스트',
    'emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈', "don't won't I'm you're we've they'll he'd",
    "DON'T I'M 'quoted' ''s", '3.14159 1,000,000 2026-11-21 0x1F 1e10', 'line\r\nwindows\r\n',
    'non\u00a0breaking\u00a0space', 'zero\u200bwidth', '<|endoftext|>', 'a<|endoftext|>b',
    'ab<|endoftext|><|endoftext|>\n<|endoftext', '\x00\x01 control \x7f', 'ﬁ ligature Ǆ',
    '    def f(x):\n        return x  # code\n', 'mixed 123abc abc123 ...!!! ???',
]


@pytest.fixture(scope='module')
def enc():
    return encoder.get_encoder()


@pytest.fixture(scope='module')
def oracle():
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(HERE, 'vocab.bpe'),
                                            os.path.join(HERE, 'encoder.json'))
    return tiktoken.Encoding('gpt2-oracle', pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={encoder.EOT: encoder.EOT_ID})


# SHA-256 of encoder.json and vocab.bpe in OpenAI's release (models/124M/, the same for every size).
OPENAI_VOCAB_SHA256 = {
    'encoder.json': '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783',
    'vocab.bpe': '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
}


@pytest.mark.parametrize('name', sorted(OPENAI_VOCAB_SHA256))
def test_shipped_vocabulary_is_openais(name):
    with open(os.path.join(HERE, name), 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == OPENAI_VOCAB_SHA256[name]
    release = os.path.join(SHARED, 'gpt2-117M', name)
    if os.path.isfile(release):  # and, where ../shared is beside the clone, the release file itself
        with open(os.path.join(HERE, name), 'rb') as a, open(release, 'rb') as b:
            assert a.read() == b.read()


@pytest.mark.parametrize('path', corpus_files(), ids=os.path.basename)
def test_corpora_match_tiktoken(enc, oracle, path):
    text = open(path, encoding='utf-8').read()
    ids = enc.encode(text)
    assert ids == oracle.encode_ordinary(text)
    assert enc.decode(ids) == text


@pytest.mark.parametrize('text', EDGE_CASES)
def test_edge_cases_match_tiktoken(enc, oracle, text):
    assert enc.encode(text) == oracle.encode_ordinary(text)
    assert enc.encode(text, allowed_special='all') == oracle.encode(text, allowed_special='all')
    assert enc.decode(enc.encode(text)) == text


def test_endoftext_is_text_by_default_and_one_id_when_allowed(enc):
    as_text = enc.encode('a<|endoftext|>b')
    assert encoder.EOT_ID not in as_text and len(as_text) > 3
    assert enc.encode('a<|endoftext|>b', allowed_special=[encoder.EOT]) == [64, 50256, 65]
    assert enc.decode([64, 50256, 65]) == 'a<|endoftext|>b'
    with pytest.raises(encoder.EncoderError, match='unknown special'):
        enc.encode('x', allowed_special=['<|nope|>'])


def test_decode_replaces_invalid_utf8_and_rejects_bad_ids(enc):
    # 'é' is two bytes; its first byte alone is not valid UTF-8.
    first_byte = enc.encoder[encoder.bytes_to_unicode()[0xC3]]
    assert enc.decode([first_byte]) == '\ufffd'
    assert enc.decode([first_byte, 64]) == '\ufffda'
    with pytest.raises(encoder.EncoderError, match='out of range'):
        enc.decode([50257])


def test_model_folder_vocabulary_is_preferred(tmp_path):
    vocab = {'a': 0, 'b': 1, 'ab': 2, '<|endoftext|>': 3}
    (tmp_path / 'encoder.json').write_text(__import__('json').dumps(vocab))
    (tmp_path / 'vocab.bpe').write_text('#version: 0.2\na b\n')
    own = encoder.get_encoder(str(tmp_path))
    assert own.encode('ab') == [2] and own.n_vocab == 4
    assert encoder.get_encoder(str(tmp_path / 'elsewhere')).n_vocab == 50257


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_inverts_encode_on_any_unicode(enc, text):
    assert enc.decode(enc.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 'sll\n\t1é北👍\u00a0<|>endoftx")), max_size=40))
def test_tricky_alphabet_matches_tiktoken(enc, oracle, text):
    assert enc.encode(text) == oracle.encode_ordinary(text)


def test_learned_words_pass_to_another_encoder(monkeypatch):
    # What --workers relies on: words one encoder learned, given to another, give the same ids
    # there without running BPE again.
    from encoder import bpe
    text = 'Antidisestablishmentarianism, naïveté and 北京 in one sentence.'
    first, second = (bpe._load.__wrapped__(*bpe.vocab_files(None)) for _ in range(2))
    count = first.word_count
    expected = first.encode(text)
    learned = first.words_since(count)
    assert len(learned) == len(set(bpe.pretokenize(text))) == first.word_count - count
    assert first.words_since(first.word_count) == []
    assert first.words_since(first.word_count + 5) == learned  # the cache was emptied since
    second.add_words(learned)
    monkeypatch.setattr(second, '_bpe', lambda word: pytest.fail(f'BPE ran for {word!r}'))
    before = second.word_count
    assert second.encode(text) == expected
    assert second.word_count == before  # every word came from `first`


def test_merge_lines_with_odd_spacing_load_and_malformed_ones_are_reported(tmp_path):
    vocab = {'a': 0, 'b': 1, 'c': 2, 'ab': 3, 'abc': 4}
    (tmp_path / 'encoder.json').write_text(__import__('json').dumps(vocab))
    (tmp_path / 'vocab.bpe').write_text('#version: 0.2\na  b\t\nab c\n')
    own = encoder.get_encoder(str(tmp_path))
    assert own.encode('abc') == [4] and own.encode('cab') == [2, 3]
    assert own.encode('ababc') == [3, 4]  # both (a, b) in one pass, then (ab, c)
    assert own.bpe_ranks == {('a', 'b'): 0, ('ab', 'c'): 1}
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'encoder.json').write_text(__import__('json').dumps(vocab))
    (bad / 'vocab.bpe').write_text('#version: 0.2\na b c\n')
    with pytest.raises(encoder.EncoderError, match='malformed BPE vocabulary'):
        encoder.get_encoder(str(bad))


def test_the_encoder_package_stands_alone():
    """encoder/ is a BPE package usable without gpt2/: importing and using it loads no gpt2
    module."""
    code = ('import sys, encoder; encoder.get_encoder().encode("x");'
            'loaded = [m for m in sys.modules if m.split(".")[0] == "gpt2"];'
            'print(loaded); sys.exit(1 if loaded else 0)')
    root = os.path.dirname(HERE)  # the checkout under test, not an installed copy
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root), timeout=120)
    assert out.returncode == 0, out.stderr
