"""encode.py, gpt2.encoding and gpt2.mixture: the .npz format, separators, csv, streaming pieces,
workers, mixtures, and every bad input as one line."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import encoder
from encoder import bpe
from gpt2 import corpus, encoding, mixture
from gpt2.errors import UserError
from tests.conftest import ROOT, real_text

EOT = encoder.EOT_ID
ENC = encoder.get_encoder()


def _write(path, text, mode='w'):
    if mode == 'wb':
        path.write_bytes(text)
    else:
        path.write_text(text, encoding='utf-8')
    return str(path)


def _encode(tmp_path, inputs, **kw):
    out = str(tmp_path / 'out.npz')
    kw.setdefault('progress', False)
    kw.setdefault('workers', 1)
    stats = encoding.encode_files(inputs, out, **kw)
    with np.load(out) as z:
        return [z[k] for k in z.files], z.files, stats


def _corpus_sample(chars=60000):
    return real_text(chars)  # committed prose (tests/data/corpora)


# --- the tokenizer pieces ---------------------------------------------------------------------

CHARS = list('ab Z\n\t\r 7\'s.,!é漢ß\u00a0\u2003\x1c\x85') + ['𝔘', '😀']
TEXT = st.text(st.sampled_from(CHARS), max_size=60)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_fast_pretokenizer_splits_as_the_reference_pattern(text):
    assert bpe._bmp_pattern().findall(text.replace('𝔘', 'U').replace('😀', ':')) == \
        bpe.PATTERN.findall(text.replace('𝔘', 'U').replace('😀', ':'))
    assert bpe.pretokenize(text) == bpe.PATTERN.findall(text)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT)
def test_cut_point_is_safe(a, b):
    text = a + b
    p = corpus.cut_point(text)
    assert 0 <= p < max(len(text), 1)
    if p:
        assert ENC.encode(text[:p]) + ENC.encode(text[p:]) == ENC.encode(text)


def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding built offline from our vocabulary files."""
    import tiktoken
    ranks = {ENC._token_bytes[i]: i for t, i in ENC.encoder.items() if t != encoder.EOT}
    return tiktoken.Encoding(
        'gpt2-local', mergeable_ranks=ranks, special_tokens={encoder.EOT: EOT},
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def test_encode_array_matches_tiktoken_on_a_real_text():
    # The encoder's fast paths (stdlib pre-tokeniser, packed word cache) against the oracle.
    text = _corpus_sample(200000) + ' 😀 𝔘nicode<|endoftext|>tail'
    tk = tiktoken_gpt2()
    got = ENC.encode_array(text, allowed_special=[encoder.EOT])
    assert got.dtype == np.dtype('<u2')
    assert got.tolist() == tk.encode(text, allowed_special={encoder.EOT})
    assert ENC.encode(text) == tk.encode_ordinary(text)


def test_pieces_of_a_real_text_encode_as_the_whole(tmp_path):
    text = _corpus_sample() + '\r\nlast line  \n\n  '
    path = _write(tmp_path / 'c.txt', text)
    pieces = list(corpus.read_pieces(path, piece_chars=3000, block=1000))
    assert len(pieces) > 10
    assert all(len(p) < 4000 for p, _ in pieces)
    assert ''.join(p for p, _ in pieces) == text
    assert sum(n for _, n in pieces) == os.path.getsize(path)
    ids = [i for p, _ in pieces for i in ENC.encode(p)]
    assert ids == ENC.encode(text)


def test_a_large_read_block_is_cut_into_pieces_of_the_piece_size(tmp_path):
    # Pieces are the unit of work for the encoding processes: a 1 MB read block must not
    # become a single 1 MB task. The block's bytes are shared among its pieces.
    text = _corpus_sample()
    path = _write(tmp_path / 'c.txt', text)
    pieces = list(corpus.read_pieces(path, piece_chars=3000, block=1 << 20))
    assert len(pieces) > 15 and all(len(p) <= 3000 for p, _ in pieces)
    assert ''.join(p for p, _ in pieces) == text
    assert all(n > 0 for _, n in pieces) and sum(n for _, n in pieces) == os.path.getsize(path)


def test_pieces_are_bounded_by_the_piece_size_not_the_file(tmp_path):
    path = _write(tmp_path / 'big.txt', 'word ' * 10 + ('line of text\n' * 40000))
    sizes = [len(p) for p, _ in corpus.read_pieces(path, piece_chars=4096, block=1024)]
    assert max(sizes) < 4096 + 1024 and len(sizes) > 100


# --- the .npz format --------------------------------------------------------------------------

def test_npz_is_uint16_chunks_with_eot_between_documents(tmp_path):
    a = _write(tmp_path / 'a.txt', 'Hello there.\n')
    b = _write(tmp_path / 'b.txt', 'General Kenobi!')
    chunks, names, stats = _encode(tmp_path, [a, b])
    assert names == ['arr_0'] and chunks[0].dtype == np.dtype('<u2')
    assert chunks[0].tolist() == (ENC.encode('Hello there.\n') + [EOT]
                                  + ENC.encode('General Kenobi!'))
    assert stats['tokens'] == len(chunks[0]) and stats['chunks'] == 1
    # --noseparator: the documents simply follow each other.
    chunks, _, _ = _encode(tmp_path, [a, b], separator=False)
    assert EOT not in chunks[0].tolist()


def test_literal_eot_in_a_text_file_is_one_token(tmp_path):
    a = _write(tmp_path / 'posts.txt', 'post one<|endoftext|>post two')
    chunks, _, _ = _encode(tmp_path, [a])
    assert chunks[0].tolist() == ENC.encode('post one') + [EOT] + ENC.encode('post two')
    chunks, _, _ = _encode(tmp_path, [a], eot_in_text=False)
    assert EOT not in chunks[0].tolist()
    assert chunks[0].tolist() == ENC.encode('post one<|endoftext|>post two')


def test_combine_closes_chunks_and_npz_inputs_stay_chunks(tmp_path):
    files = [_write(tmp_path / f'{i}.txt', f'file {i} ' * 10) for i in range(4)]  # 70 chars
    chunks, names, _ = _encode(tmp_path, files, combine=100)
    assert names == ['arr_0', 'arr_1']  # 2 files reach 100 characters
    assert [c.tolist().count(EOT) for c in chunks] == [1, 1]
    np.savez(tmp_path / 'pre.npz', np.array([1, 2, 3]), np.array([4]))
    chunks, _, _ = _encode(tmp_path, [files[0], str(tmp_path / 'pre.npz'), files[1]])
    assert [c.tolist() for c in chunks] == [ENC.encode('file 0 ' * 10), [1, 2, 3], [4],
                                            ENC.encode('file 1 ' * 10)]


def test_folders_and_globs_in_sorted_order(tmp_path):
    (tmp_path / 'd' / 'sub').mkdir(parents=True)
    _write(tmp_path / 'd' / 'b.txt', 'B')
    _write(tmp_path / 'd' / 'sub' / 'a.txt', 'A')
    _write(tmp_path / 'd' / '.hidden', 'H')
    chunks, _, stats = _encode(tmp_path, [str(tmp_path / 'd')])
    assert chunks[0].tolist() == ENC.encode('B') + [EOT] + ENC.encode('A') and stats['files'] == 2
    chunks, _, _ = _encode(tmp_path, [str(tmp_path / 'd' / '**' / '*.txt')])
    assert stats['files'] == 2 and len(chunks[0]) == 3


def test_csv_rows_become_documents(tmp_path):
    path = _write(tmp_path / 'posts.csv',
                  'id,text\n1,"first, post"\n2,"second\nline"\n,\n3,third\n')
    chunks, _, _ = _encode(tmp_path, [path], column='text')
    docs = ['first, post', 'second\nline', 'third']
    expected = ENC.encode(docs[0]) + [EOT] + ENC.encode(docs[1]) + [EOT] + ENC.encode(docs[2])
    assert chunks[0].tolist() == expected
    assert _encode(tmp_path, [path], column=1)[0][0].tolist() == expected
    nohead = _write(tmp_path / 'n.csv', 'a,x\nb,y\n')
    assert _encode(tmp_path, [nohead], header=False)[0][0].tolist() == \
        ENC.encode('a') + [EOT] + ENC.encode('b')
    with pytest.raises(UserError, match="no column 'body'"):
        _encode(tmp_path, [path], column='body')


def test_workers_give_the_same_file_as_one_process(tmp_path):
    text = _corpus_sample(40000)
    files = [_write(tmp_path / f'{i}.txt', text[i * 10000:(i + 1) * 10000]) for i in range(4)]
    kw = dict(piece_chars=2000, combine=15000)
    one, _, _ = _encode(tmp_path, files, workers=1, **kw)
    two, _, _ = _encode(tmp_path, files, workers=2, **kw)
    assert len(one) == 2
    assert [c.tolist() for c in one] == [c.tolist() for c in two]
    whole = ENC.encode(text[:10000]) + [EOT] + ENC.encode(text[10000:20000])
    assert one[0].tolist() == whole


@pytest.mark.parametrize('workers', [2, 3])
def test_workers_keep_every_kind_of_input_in_order(tmp_path, workers):
    # Many small tasks (piece_chars=1500) over a long file, a folder, a .csv and an .npz, so
    # the pool, this process and the words they pass each other all take part.
    text = _corpus_sample(30000)
    (tmp_path / 'folder').mkdir()
    long = _write(tmp_path / 'long.txt', text[:20000])
    _write(tmp_path / 'folder' / 'a.txt', text[20000:24000])
    _write(tmp_path / 'folder' / 'b.txt', text[24000:26000])
    rows = [text[26000 + i * 500:26500 + i * 500] for i in range(8)]
    with open(tmp_path / 'rows.csv', 'w', encoding='utf-8', newline='') as f:
        csv.writer(f).writerows([['text']] + [[r] for r in rows])
    np.savez(tmp_path / 'pre.npz', np.array([7, 8, 9]))
    inputs = [long, str(tmp_path / 'pre.npz'), str(tmp_path / 'folder'),
              str(tmp_path / 'rows.csv')]
    kw = dict(piece_chars=1500, combine=3000)
    one, _, _ = _encode(tmp_path, inputs, workers=1, **kw)
    many, _, _ = _encode(tmp_path, inputs, workers=workers, **kw)
    assert [c.tolist() for c in many] == [c.tolist() for c in one]

    def joined(docs):
        return [i for d in docs for i in [EOT] + ENC.encode(d)][1:]

    # A chunk closes at the document that brings it to 3000 characters.
    expected = [ENC.encode(text[:20000]), [7, 8, 9], ENC.encode(text[20000:24000]),
                joined([text[24000:26000]] + rows[:2]), joined(rows[2:])]
    assert [c.tolist() for c in one] == expected


def test_large_chunk_spills_to_disk_with_the_same_result(tmp_path, monkeypatch):
    path = _write(tmp_path / 'c.txt', _corpus_sample(20000))
    expected, _, _ = _encode(tmp_path, [path], piece_chars=1000)
    monkeypatch.setattr(encoding, 'SPILL_BYTES', 500)
    spilled, _, _ = _encode(tmp_path, [path], piece_chars=1000)
    assert spilled[0].tolist() == expected[0].tolist() == ENC.encode(_corpus_sample(20000))


def test_model_vocabulary_falls_back_to_the_built_in_one(tmp_path):
    a = _write(tmp_path / 'a.txt', 'same ids')
    chunks, _, _ = _encode(tmp_path, [a], model_dir=str(tmp_path / 'no-such-model'))
    assert chunks[0].tolist() == ENC.encode('same ids')


def _model_with_its_own_vocabulary(models_dir):
    # models_dir/mine/ with GPT-2's vocabulary less its later merges, so its ids differ
    folder = models_dir / 'mine'
    folder.mkdir(parents=True)
    built_in = os.path.dirname(encoder.__file__)
    with open(os.path.join(built_in, 'encoder.json'), encoding='utf-8') as f:
        _write(folder / 'encoder.json', f.read())
    with open(os.path.join(built_in, 'vocab.bpe'), encoding='utf-8') as f:
        _write(folder / 'vocab.bpe', ''.join(f.readlines()[:2000]))
    return str(folder)


@pytest.mark.parametrize('command', ['encode', 'mix'])
def test_script_encodes_with_the_vocabulary_of_model_name(tmp_path, command):
    # (encode.py's *paths once hid the module gpt2.paths: --model_name was an AttributeError)
    text = 'Meditations on the unremarkable'
    _write(tmp_path / 'a.txt', text + '\n')
    mine = encoder.get_encoder(_model_with_its_own_vocabulary(tmp_path / 'models'))
    assert mine.encode(text) != ENC.encode(text)
    args = ['mix', 'a.txt', 'a.txt'] if command == 'mix' else ['a.txt']
    r = _run(*args, 'o.npz', '--model_name=mine', '--models_dir=models', '--workers=1',
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / 'o.npz') as z:
        ids = z['arr_0'].tolist()
    assert ids[:len(mine.encode(text))] == mine.encode(text)


# --- bad input ---------------------------------------------------------------------------------

def test_missing_input(tmp_path):
    with pytest.raises(UserError, match='no such file'):
        _encode(tmp_path, [str(tmp_path / 'nope.txt')])


def test_empty_corpus(tmp_path):
    with pytest.raises(UserError, match='empty'):
        _encode(tmp_path, [_write(tmp_path / 'e.txt', '')])
    assert not os.path.exists(tmp_path / 'out.npz')


def test_binary_file(tmp_path):
    good = _write(tmp_path / 'a.txt', 'fine text\n')
    binary = _write(tmp_path / 'b.bin', b'PK\x03\x04\x00\x00data', mode='wb')
    with pytest.raises(UserError, match=r'binary file \(a NUL byte at byte 4\)'):
        _encode(tmp_path, [good, binary])
    # Nothing under the final name, no temporary file left behind.
    assert sorted(os.listdir(tmp_path)) == ['a.txt', 'b.bin']


def test_invalid_utf8_reports_the_byte_offset(tmp_path):
    bad = _write(tmp_path / 'l.txt', b'caf\xc3\xa9 ' * 10 + b'na\xefve\n', mode='wb')
    with pytest.raises(UserError, match=r'l.txt is not valid utf-8: byte 62 is ef'):
        list(corpus.read_blocks(bad, block=16))  # the bad byte lies in a later block
    with pytest.raises(UserError, match='byte 62'):
        _encode(tmp_path, [bad])
    chunks, _, _ = _encode(tmp_path, [bad], errors='replace')
    assert ENC.decode(chunks[0].tolist()).endswith('na\ufffdve\n')
    assert _encode(tmp_path, [bad], encoding='latin-1')[0][0].tolist() == \
        ENC.encode(('caf\xc3\xa9 ' * 10) + 'na\xefve\n')
    csv_bad = _write(tmp_path / 'x.csv', b'text\nok\nna\xefve\n', mode='wb')
    with pytest.raises(UserError, match='byte 10'):
        _encode(tmp_path, [csv_bad])


def test_bad_output_paths(tmp_path):
    a = _write(tmp_path / 'a.txt', 'text')
    with pytest.raises(UserError, match='does not exist'):
        encoding.encode_files([a], str(tmp_path / 'missing' / 'o.npz'), progress=False)
    with pytest.raises(UserError, match='must end in .npz'):
        encoding.encode_files([a], str(tmp_path / 'b.txt'), progress=False)
    np.savez(tmp_path / 'a.npz', np.array([1]))
    with pytest.raises(UserError, match='also an input'):
        encoding.encode_files([a, str(tmp_path / 'a.npz')], str(tmp_path / 'a.npz'),
                              progress=False)
    with pytest.raises(UserError, match='--errors'):
        _encode(tmp_path, [a], errors='loose')
    with pytest.raises(UserError, match='--workers'):
        _encode(tmp_path, [a], workers=0)


def _run(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'encode.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('case', ['missing', 'binary', 'utf8', 'folder', 'empty', 'mix_filters'])
def test_script_errors_are_one_line_and_exit_1(tmp_path, case):
    _write(tmp_path / 'ok.txt', 'some text\n')
    _write(tmp_path / 'bin.dat', b'\x00\x01', mode='wb')
    _write(tmp_path / 'bad.txt', b'ab\xff', mode='wb')
    _write(tmp_path / 'empty.txt', '')
    args = {'missing': ['nope.txt', 'o.npz'], 'binary': ['ok.txt', 'bin.dat', 'o.npz'],
            'utf8': ['bad.txt', 'o.npz'], 'folder': ['ok.txt', 'no/dir/o.npz'],
            'empty': ['empty.txt', 'o.npz'],
            'mix_filters': ['mix', 'ok.txt', 'ok.txt', 'o.npz', '--min_chars=100']}[case]
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('encode.py'), r.stderr
    assert 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'o.npz')
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]


def test_script_encodes_and_reports(tmp_path):
    _write(tmp_path / 'ok.txt', 'some text\n')
    r = _run('ok.txt', 'o.npz', '--workers=1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'o.npz: 3 tokens in 1 chunk(s)' in r.stdout
    with np.load(tmp_path / 'o.npz') as z:
        assert z['arr_0'].tolist() == ENC.encode('some text\n')


# --- mixtures ----------------------------------------------------------------------------------

def test_mixture_is_round_robin_and_longest_by_default(tmp_path):
    a = _write(tmp_path / 'a.txt', 'a1\na2\na3\n')
    b = _write(tmp_path / 'b.txt', 'b1\n\nb2\n')
    c = _write(tmp_path / 'c.txt', 'c1\n')
    assert list(mixture.mixture([a, b, c])) == ['a1', 'b1', 'c1', 'a2', 'b2', 'a3']
    assert list(mixture.mixture([a, b, c], until='shortest')) == ['a1', 'b1', 'c1', 'a2', 'b2']


def test_mixture_units_and_filters(tmp_path):
    a = _write(tmp_path / 'a.txt',
               'One. Two, 2 words!\nStill two? Yes.\n\nNew para "quoted."  Ok\n')
    b = _write(tmp_path / 'b.txt', 'x\n')
    assert list(mixture.mixture([a], unit='sentence')) == [
        'One.', 'Two, 2 words!', 'Still two?', 'Yes.', 'New para "quoted."', 'Ok']
    assert list(mixture.mixture([a], unit='paragraph')) == [
        'One. Two, 2 words!\nStill two? Yes.', 'New para "quoted."  Ok']
    assert list(mixture.mixture([a], unit='sentence', strip_punct=True, strip_digits=True)) == [
        'One', 'Two words', 'Still two', 'Yes', 'New para quoted', 'Ok']
    assert list(mixture.mixture([a, b], unit='sentence', min_chars=5, max_chars=10)) == [
        'Still two?']
    assert list(mixture.mixture([a, b], unit='line', min_chars=2)) == [
        'One. Two, 2 words!', 'Still two? Yes.', 'New para "quoted."  Ok']


def test_mixture_text_out_is_what_is_encoded(tmp_path):
    a = _write(tmp_path / 'a.txt', 'Alpha one.\nAlpha two.\n')
    b = _write(tmp_path / 'b.txt', '  Beta one.\nBeta two.\nBeta three.\n')
    out, text = str(tmp_path / 'm.npz'), str(tmp_path / 'm.txt')
    mixture.encode_mixture([a, b], out, text_out=text, progress=False, workers=1,
                           piece_chars=12)
    with open(text, encoding='utf-8') as f:
        mixed = f.read()
    assert mixed == 'Alpha one.\n  Beta one.\nAlpha two.\nBeta two.\nBeta three.\n'
    with np.load(out) as z:
        assert z.files == ['arr_0'] and z['arr_0'].tolist() == ENC.encode(mixed)
    with pytest.raises(UserError, match='--unit'):
        mixture.encode_mixture([a, b], out, unit='word', progress=False)
    with pytest.raises(UserError, match='no such file'):
        mixture.encode_mixture([a, str(tmp_path / 'nope')], out, progress=False)


def test_progress_bar_is_skipped_when_off(tmp_path):
    with encoding.progress_bar(100, 'encoding', enabled=False) as update:
        assert update is None
    with encoding.progress_bar(100, 'encoding') as update:
        update(40)  # tqdm's update, silent off a terminal
    a = _write(tmp_path / 'a.txt', 'counted in bytes')
    seen = []
    list(encoding.encode_items(corpus.read([a]), progress=seen.append))
    assert sum(seen) == os.path.getsize(a)
