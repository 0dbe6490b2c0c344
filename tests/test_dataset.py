"""gpt2.dataset: loading chunks, the fair window sampler, its state, validation batches."""
import json

import numpy as np
import pytest

import encoder
from gpt2 import dataset
from gpt2.errors import UserError


def _write(path, text):
    path.write_text(text, encoding='utf-8')
    return str(path)


def test_npz_round_trip(tmp_path):
    chunks = [np.arange(10, dtype=np.uint16), np.array([50256, 1, 2], dtype=np.uint16)]
    np.savez(tmp_path / 'c.npz', *chunks)
    got = dataset.load_npz(str(tmp_path / 'c.npz'))
    assert [c.dtype for c in got] == [np.int32, np.int32]
    assert [c.tolist() for c in got] == [c.tolist() for c in chunks]


def test_load_chunks_joins_small_files_with_one_eot(tmp_path):
    a = _write(tmp_path / 'a.txt', 'first file')
    b = _write(tmp_path / 'b.txt', 'second file')
    enc = encoder.get_encoder()
    chunks = dataset.load_chunks([a, b])
    assert len(chunks) == 1
    assert chunks[0].tolist() == (enc.encode('first file') + [encoder.EOT_ID]
                                  + enc.encode('second file'))
    # combine=1: every file closes its chunk, and a chunk holds no separator.
    assert [c.tolist() for c in dataset.load_chunks([a, b], combine=1)] == [
        enc.encode('first file'), enc.encode('second file')]


def test_load_chunks_matches_npz_written_by_encode_files(tmp_path):
    from gpt2 import encoding
    a = _write(tmp_path / 'a.txt', 'alpha beta\n' * 50)
    b = _write(tmp_path / 'b.txt', 'gamma\n')
    encoding.encode_files([a, b], str(tmp_path / 'o.npz'), combine=100, progress=False,
                          workers=1)
    from_npz = dataset.load_chunks([str(tmp_path / 'o.npz')])
    assert [c.tolist() for c in from_npz] == [c.tolist() for c in
                                              dataset.load_chunks([a, b], combine=100)]


def test_load_chunks_empty_dataset(tmp_path):
    empty = _write(tmp_path / 'empty.txt', '')
    with pytest.raises(UserError, match='empty'):
        dataset.load_chunks([empty])


def test_sampler_never_crosses_a_chunk_boundary():
    # Every token says which chunk it is from: a window mixing two values crossed a boundary.
    chunks = [np.full(n, i, dtype=np.int32) for i, n in enumerate([5, 9, 3, 20, 8])]
    sampler = dataset.Sampler(chunks, 4, seed=0)
    for _ in range(2000):
        w = sampler.sample()
        assert len(w) == 4 and len(set(w.tolist())) == 1


def test_sampler_is_uniform_over_start_positions():
    # Each token is its global position, so a window's first token names its start. Chi-square
    # against the uniform distribution over all valid starts (4 + 1 + 0 + 7 = 12 of them).
    lengths, length = [7, 4, 2, 10], 4
    offsets = np.cumsum([0] + lengths[:-1])
    chunks = [np.arange(o, o + n, dtype=np.int32) for o, n in zip(offsets, lengths)]
    valid = [o + s for o, n in zip(offsets, lengths) for s in range(n - length + 1)]
    sampler = dataset.Sampler(chunks, length, seed=123)
    assert sampler.total == len(valid) == 12
    draws = 24000
    counts = {v: 0 for v in valid}
    for row in sampler.batch(draws):
        counts[int(row[0])] += 1  # a KeyError here would be a start that is not valid
    expected = draws / len(valid)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    # 11 degrees of freedom: the 99.9th percentile is 31.26; a sampler that picked a chunk
    # uniformly first (not a position) gives chi2 in the thousands here.
    assert chi2 < 31.26, (chi2, counts)


def test_sampler_state_round_trips_through_json():
    chunks = [np.arange(100, dtype=np.int32), np.arange(50, dtype=np.int32)]
    s = dataset.Sampler(chunks, 8, seed=5)
    s.batch(3)
    state = json.loads(json.dumps(s.state()))
    expected = s.batch(4)
    restored = dataset.Sampler(chunks, 8, seed=999)
    restored.set_state(state)
    np.testing.assert_array_equal(restored.batch(4), expected)
    assert expected.shape == (4, 8) and expected.dtype == np.int32


def test_sampler_seeded():
    chunks = [np.arange(100, dtype=np.int32)]
    np.testing.assert_array_equal(dataset.Sampler(chunks, 8, seed=1).batch(5),
                                  dataset.Sampler(chunks, 8, seed=1).batch(5))


def test_corpus_shorter_than_the_window_says_how_many_tokens():
    chunks = [np.arange(10, dtype=np.int32), np.arange(6, dtype=np.int32)]
    with pytest.raises(UserError) as e:
        dataset.Sampler(chunks, 1024)
    msg = str(e.value)
    assert '16 tokens' in msg and 'longest 10' in msg and 'needs 1024' in msg
    assert '\n' not in msg


def test_validation_batches_are_fixed():
    chunks = [np.arange(200, dtype=np.int32)]
    a = dataset.validation_batches(chunks, 16, 2, 3, seed=1)
    b = dataset.validation_batches(chunks, 16, 2, 3, seed=1)
    assert len(a) == 3 and all(x.shape == (2, 16) for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
