"""Byte-level BPE with OpenAI's token ids (tiktoken's results), made fast by caching each word's
ids as packed bytes and by pre-tokenising text without astral characters with the stdlib `re`."""
import functools
import itertools
import json
import os
import re

import numpy as np
import regex


class EncoderError(ValueError):
    """Bad vocabulary files, unknown special tokens or ids out of range; the message says which
    and what was expected (gpt2's scripts print it as one line)."""


# OpenAI's pre-tokenisation: contractions, letters, numbers, other symbols, whitespace runs.
PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = '<|endoftext|>'
EOT_ID = 50256
_HERE = os.path.dirname(os.path.abspath(__file__))
_CACHE_LIMIT = 1 << 20  # words; bounds memory on huge corpora with many distinct words
_ASTRAL = re.compile('[\U00010000-\U0010ffff]')


@functools.lru_cache(maxsize=None)
def _bmp_pattern():
    """PATTERN rewritten for the stdlib `re` (about twice as fast as `regex` here), with \\p{L},
    \\p{N} and \\s spelled out as ranges taken from `regex`'s own tables, so it splits exactly as
    PATTERN does. Only valid for text without astral characters: a `re` class holding code points
    above U+FFFF falls back to a slow linear range scan."""
    bmp = ''.join(map(chr, range(0x10000)))

    def ranges(prop):
        # In `bmp` index = code point, so each run of matches is one range (a few hundred runs,
        # far cheaper to build than a list of every matching code point).
        runs = []
        for m in regex.finditer(prop + '+', bmp):
            first, last = m.start(), m.end() - 1
            runs.append(re.escape(chr(first)) + ('-' + re.escape(chr(last)) if last > first
                                                 else ''))
        return ''.join(runs)

    L, N, S = ranges(r'\p{L}'), ranges(r'\p{N}'), ranges(r'\s')
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"""
                      rf"""|[{S}]+(?![^{S}])|[{S}]+""")


def pretokenize(text):
    """PATTERN.findall(text), through the faster stdlib pattern when the text allows it."""
    if not text.isascii() and _ASTRAL.search(text):
        return PATTERN.findall(text)
    return _bmp_pattern().findall(text)


class _WordCache(dict):
    """word -> its ids packed as bytes of the id dtype; misses are computed (and the cache is
    emptied when it holds _CACHE_LIMIT words, bounding memory)."""

    def __init__(self, encode_word, dtype):
        super().__init__()
        self._encode_word = encode_word
        self._dtype = dtype

    def __missing__(self, word):
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        ids = self[word] = np.asarray(self._encode_word(word), dtype=self._dtype).tobytes()
        return ids


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
    """Map each byte to a printable unicode character (OpenAI's table), so BPE works on strings."""
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Encoder:
    """encode: str -> ids; decode: ids -> str. `<|endoftext|>` is plain text unless allowed."""

    def __init__(self, vocab, merges):
        """vocab: token -> id (encoder.json); merges: the merge rules in rank order, each as its
        line of vocab.bpe, 'a b'."""
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        # 'a b' -> rank of the merge (a, b): one string hashes faster than a tuple of two, and no
        # token holds a space (bytes_to_unicode maps it to 'Ġ'), so the key is unambiguous.
        self._pair_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.special_tokens = {EOT: vocab[EOT]} if EOT in vocab else {}
        self.eot_token = self.special_tokens.get(EOT)
        # Text bytes, decoded as latin-1, translate to the byte-level alphabet in C.
        self._byte_translation = str.maketrans({chr(b): c for b, c in self.byte_encoder.items()})
        size = max(self.decoder) + 1
        self._special_bytes = {i: t.encode('utf-8') for t, i in self.special_tokens.items()}
        # Ids are packed as little-endian uint16 when the vocabulary fits (GPT-2's does).
        self.dtype = np.dtype('<u2' if size <= 1 << 16 else '<u4')
        self._words = _WordCache(self._encode_word, self.dtype)

    @functools.cached_property
    def _token_bytes(self):
        """id -> the bytes of its token; built on first decode (encoding never needs it, and a
        vocabulary load is on the critical path of every encode.py run)."""
        # str.translate maps each character back to the byte it stands for (as a code point
        # below 256), so encoding to latin-1 gives those bytes: all in C.
        table = str.maketrans({c: chr(b) for c, b in self.byte_decoder.items()})
        out = [b''] * (max(self.decoder) + 1)
        for i, t in self.decoder.items():
            out[i] = t.translate(table).encode('latin-1')
        return out

    @functools.cached_property
    def bpe_ranks(self):
        """(a, b) -> rank, as OpenAI's encoder.py has it."""
        return {tuple(pair.split(' ')): i for pair, i in self._pair_ranks.items()}

    @property
    def n_vocab(self):
        return len(self.encoder)

    def _bpe(self, word):
        """Merge the lowest-ranked adjacent pair (every occurrence, left to right, as OpenAI's
        encoder.py does) until no adjacent pair is in the merge table."""
        parts = list(word)
        get = self._pair_ranks.get
        none = len(self._pair_ranks)  # ranks past every merge: "not a merge"
        ranks = [get(a + ' ' + b, none) for a, b in zip(parts, parts[1:])]
        while ranks:
            best = min(ranks)
            if best == none:
                break
            i = ranks.index(best)
            while True:
                # Merge at i; only the ranks of the pairs beside it change.
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
                del ranks[i]
                if i < len(ranks):
                    ranks[i] = get(parts[i] + ' ' + parts[i + 1], none)
                if i:
                    ranks[i - 1] = get(parts[i - 1] + ' ' + parts[i], none)
                # The pass goes on to the next occurrence of the same pair (ranks are unique
                # per pair): what was at i + 2 is at i + 1 now.
                try:
                    i = ranks.index(best, i + 1)
                except ValueError:
                    break
        return parts

    def _encode_word(self, word):
        word = word.encode('utf-8').decode('latin-1').translate(self._byte_translation)
        # A word that is itself a token is that token (tiktoken's rule, and most words).
        whole = self.encoder.get(word)
        if whole is not None:
            return (whole,)
        return tuple(map(self.encoder.__getitem__, self._bpe(word)))

    def _ordinary_bytes(self, text):
        # map/join run in C; only words never seen before reach Python (_WordCache.__missing__).
        return b''.join(map(self._words.__getitem__, pretokenize(text)))

    @property
    def word_count(self):
        """How many words the word cache holds."""
        return len(self._words)

    def words_since(self, count):
        """The (word, packed ids) pairs the word cache gained after it held `count` words (all it
        holds if it was emptied since). With add_words, processes encoding one corpus share their
        BPE work instead of each repeating it for every word."""
        return list(itertools.islice(self._words.items(), count if count <= len(self._words)
                                     else 0, None))

    def add_words(self, pairs):
        """Put (word, packed ids) pairs from another encoder of the same vocabulary (see
        words_since) in the word cache."""
        self._words.update(pairs)

    def encode_ordinary(self, text):
        """Ids of `text`, treating every character as text (special tokens included)."""
        return np.frombuffer(self._ordinary_bytes(text), self.dtype).tolist()

    def encode_array(self, text, *, allowed_special=()):
        """encode() as a 1-D NumPy array of `self.dtype` (uint16 for GPT-2), without Python ints."""
        pieces = []
        for special, piece in self._split_special(text, allowed_special):
            pieces.append(np.asarray([self.special_tokens[special]], self.dtype).tobytes()
                          if special else self._ordinary_bytes(piece))
        return np.frombuffer(b''.join(pieces), self.dtype)

    def encode(self, text, *, allowed_special=()):
        """Ids of `text`. Special tokens named in `allowed_special` (or 'all') become their single id.

        By default `<|endoftext|>` in the text is encoded as the characters it is made of, so text
        from a user can never inject a document boundary by accident.
        """
        return self.encode_array(text, allowed_special=allowed_special).tolist()

    def _split_special(self, text, allowed_special):
        """(special, None) for each allowed special token in `text`, (None, piece) between them."""
        if allowed_special == 'all':
            allowed_special = self.special_tokens.keys()
        unknown = [t for t in allowed_special if t not in self.special_tokens]
        if unknown:
            raise EncoderError(f'unknown special tokens {unknown}; known: '
                               f'{list(self.special_tokens)}')
        allowed = [t for t in allowed_special if t in text]
        if not allowed:
            return [(None, text)] if text else []
        splitter = regex.compile('(' + '|'.join(regex.escape(t) for t in allowed) + ')')
        return [(piece, None) if i % 2 else (None, piece)
                for i, piece in enumerate(splitter.split(text)) if i % 2 or piece]

    def decode_bytes(self, ids):
        table = self._token_bytes
        try:
            return b''.join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) or hasattr(i, '__index__'))
                   or not 0 <= int(i) < len(table)]
            raise EncoderError(f'token ids out of range 0..{len(table) - 1}: {bad[:5]}') from None

    def decode(self, ids):
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD, never an error."""
        return self.decode_bytes([int(i) for i in ids]).decode('utf-8', errors='replace')


def vocab_files(model_dir=None):
    """The model folder's own encoder.json/vocab.bpe when it has them, else the shipped ones."""
    if model_dir:
        own = os.path.join(model_dir, 'encoder.json'), os.path.join(model_dir, 'vocab.bpe')
        if all(os.path.isfile(p) for p in own):
            return own
    return os.path.join(_HERE, 'encoder.json'), os.path.join(_HERE, 'vocab.bpe')


@functools.lru_cache(maxsize=8)
def _load(encoder_path, vocab_path):
    try:
        with open(encoder_path, encoding='utf-8') as f:
            vocab = json.load(f)
        with open(vocab_path, encoding='utf-8') as f:
            lines = f.read().split('\n')
    except (OSError, ValueError) as e:
        raise EncoderError(f'cannot read the BPE vocabulary ({encoder_path}, {vocab_path}): '
                           f'{e}') from None
    # First line is '#version: 0.2'; the file ends with a newline. Lines are kept as they are
    # (the encoder's keys) unless their spacing needs tidying: splitting 50,000 lines into
    # pairs took a fifth of every vocabulary load.
    merges = [line if line.count(' ') == 1 else ' '.join(line.split())
              for line in lines[1:] if line.strip()]
    bad = [m for m in merges if m.count(' ') != 1]
    if bad or not isinstance(vocab, dict):
        raise EncoderError(f'malformed BPE vocabulary in {vocab_path}: {bad[:1]}')
    return Encoder(vocab, merges)


def get_encoder(model_dir=None):
    """The encoder for a model folder (its own vocabulary files if present) or the built-in one."""
    return _load(*vocab_files(model_dir))
