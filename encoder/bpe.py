"""Byte-level BPE exactly as OpenAI's encoder.py computes it, made fast by caching each word's ids."""
import functools
import json
import os

import regex

from gpt2.errors import UserError

# OpenAI's pre-tokenisation: contractions, letters, numbers, other symbols, whitespace runs.
PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOT = '<|endoftext|>'
EOT_ID = 50256
_HERE = os.path.dirname(os.path.abspath(__file__))
_CACHE_LIMIT = 1 << 20  # words; bounds memory on huge corpora with many distinct words


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
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.special_tokens = {EOT: vocab[EOT]} if EOT in vocab else {}
        self.eot_token = self.special_tokens.get(EOT)
        self._byte_table = [self.byte_encoder[b] for b in range(256)]
        size = max(self.decoder) + 1
        self._token_bytes = [b''] * size
        for i, t in self.decoder.items():
            self._token_bytes[i] = bytes(self.byte_decoder[c] for c in t)
        self._special_bytes = {i: t.encode('utf-8') for t, i in self.special_tokens.items()}
        self._words = {}

    @property
    def n_vocab(self):
        return len(self.encoder)

    def _bpe(self, word):
        """Merge the lowest-ranked adjacent pair until none is in the merge table."""
        parts = list(word)
        ranks = self.bpe_ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _encode_word(self, word):
        table = self._byte_table
        ids = tuple(self.encoder[t] for t in self._bpe(''.join(table[b] for b in word.encode('utf-8'))))
        if len(self._words) >= _CACHE_LIMIT:
            self._words.clear()
        self._words[word] = ids
        return ids

    def encode_ordinary(self, text):
        """Ids of `text`, treating every character as text (special tokens included)."""
        words = self._words
        out = []
        extend = out.extend
        for word in PATTERN.findall(text):
            ids = words.get(word)
            extend(ids if ids is not None else self._encode_word(word))
        return out

    def encode(self, text, *, allowed_special=()):
        """Ids of `text`. Special tokens named in `allowed_special` (or 'all') become their single id.

        By default `<|endoftext|>` in the text is encoded as the characters it is made of, so text
        from a user can never inject a document boundary by accident.
        """
        if allowed_special == 'all':
            allowed_special = self.special_tokens.keys()
        allowed = [t for t in allowed_special if t in text]
        unknown = [t for t in allowed_special if t not in self.special_tokens]
        if unknown:
            raise UserError(f'unknown special tokens {unknown}; known: {list(self.special_tokens)}')
        if not allowed:
            return self.encode_ordinary(text)
        splitter = regex.compile('(' + '|'.join(regex.escape(t) for t in allowed) + ')')
        out = []
        for i, piece in enumerate(splitter.split(text)):
            if i % 2:
                out.append(self.special_tokens[piece])
            elif piece:
                out.extend(self.encode_ordinary(piece))
        return out

    def decode_bytes(self, ids):
        table = self._token_bytes
        try:
            return b''.join([table[i] for i in ids])
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) or hasattr(i, '__index__'))
                   or not 0 <= int(i) < len(table)]
            raise UserError(f'token ids out of range 0..{len(table) - 1}: {bad[:5]}') from None

    def decode(self, ids):
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD, never an error."""
        return self.decode_bytes([int(i) for i in ids]).decode('utf-8', errors='replace')


def _vocab_files(model_dir):
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
        raise UserError(f'cannot read the BPE vocabulary ({encoder_path}, {vocab_path}): {e}') from None
    # First line is '#version: 0.2'; the file ends with a newline.
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad or not isinstance(vocab, dict):
        raise UserError(f'malformed BPE vocabulary in {vocab_path}: {bad[:1]}')
    return Encoder(vocab, merges)


def get_encoder(model_dir=None):
    """The encoder for a model folder (its own vocabulary files if present) or the built-in one."""
    return _load(*_vocab_files(model_dir))
