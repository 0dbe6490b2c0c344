"""The novelty filter: index a training corpus, then drop or mark generated lines copied from it
and measure how much of the generated text the corpus already holds (a memorisation rate).

A generated line is copied when, normalised (whitespace runs collapsed, ends stripped, casefolded),
it equals a non-empty normalised line of the corpus, or when its GPT-2 BPE tokens share an n-gram
of `ngram` tokens with the corpus. N-grams are taken over normalised text: each line is encoded as
' ' + normalised line, so a word encodes to the same tokens wherever it stands, and a line's tokens
are exactly the tokens it has inside normalised running text. The corpus is one running text per
document (its lines joined by single spaces), so a passage the corpus wraps over two lines is still
found in a generated line that does not wrap it; a generated line's n-grams stay inside that line.
"""
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np

import encoder as encoder_lib
from gpt2 import corpus as corpus_lib
from gpt2 import dataset
from gpt2 import errors
from gpt2 import paths as paths_lib
from gpt2 import samples_file
from gpt2.errors import UserError

MODES = ('drop', 'mark')
MARKER = '[copied] '  # prefixed to each copied line in `mark` mode
DEFAULT_NGRAM = 8  # tokens; about six words (see README.md, novelty filter for how it was chosen)
_FLUSH = 1 << 20  # corpus tokens hashed at a time, so a huge file never lives as a Python list


def normalise(line):
    """Whitespace runs -> one space, ends stripped, casefolded: 'A  b\\t' -> 'a b'."""
    return ' '.join(line.split()).casefold()


def _line_hash(norm):
    # blake2b rather than hash(): stable across processes, so figures and tests are reproducible.
    return int.from_bytes(hashlib.blake2b(norm.encode('utf-8'), digest_size=8).digest(), 'little')


def _mix(x):
    """splitmix64's finaliser, elementwise on uint64 (wrapping multiplication is intended)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(tokens, n):
    """[T] token ids -> [T - n + 1] uint64, one hash per window of n tokens (empty if T < n).

    Each step mixes the next token into the running hash through a 64-bit bijection, so equal
    windows hash equal and different ones collide with probability about 2**-64 per pair.
    """
    t = np.asarray(tokens, dtype=np.uint64)
    m = len(t) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.full(m, n, dtype=np.uint64)
    for k in range(n):
        h = _mix(h ^ t[k:k + m])
    return h


def _contains(sorted_set, values):
    """Boolean mask: which `values` are in the sorted unique uint64 array `sorted_set`."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    i = np.searchsorted(sorted_set, values)
    return sorted_set[np.minimum(i, len(sorted_set) - 1)] == values


def _check_ngram(ngram):
    errors.check_whole('ngram', ngram, at_least=1,
                       note=f'tokens; the default, {DEFAULT_NGRAM}, is about six words')
    return ngram


def split_paths(paths):
    """'a.txt,data/' (one string from the command line) -> ['a.txt', 'data/']; a list, or the
    name of a path that exists with a comma in it, is left as it is."""
    if isinstance(paths, str) and ',' in paths and not os.path.exists(paths):
        return [p for p in paths.split(',') if p]
    return paths


def _check_mode(mode):
    errors.check_choice('mode', mode, MODES,
                        note=f'drop removes copied lines, mark prefixes them with {MARKER!r}')
    return mode


def _documents(path, enc):
    """Each document of a corpus file as a list of lines: a text file split at <|endoftext|>,
    or an .npz token file's chunks split at the end-of-text id and decoded."""
    if path.endswith('.npz'):
        for chunk in dataset.load_npz(path):
            eot = np.flatnonzero(chunk == enc.eot_token)
            for start, end in zip(np.concatenate([[0], eot + 1]), np.append(eot, len(chunk))):
                yield enc.decode(chunk[start:end].tolist()).splitlines()
        return
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f'corpus file {path} is not UTF-8 text (byte {e.start}); '
                        'convert it to UTF-8, or encode it with encode.py --errors replace and '
                        'pass the .npz') from None
    for doc in text.split(encoder_lib.EOT):
        yield doc.splitlines()


class Index:
    """Hashes of a corpus's normalised lines and of its `ngram`-token n-grams, as sorted uint64
    arrays: 8 bytes a distinct n-gram (BENCHMARKS.md has a 10 MB corpus's figures). `paths`:
    files, folders, globs (a list, or one comma-separated string); text files, and .npz token
    files decoded with `enc`.
    """

    def __init__(self, paths, *, ngram=DEFAULT_NGRAM, enc=None):
        self.ngram = _check_ngram(ngram)
        self.enc = enc or encoder_lib.get_encoder()
        self.files = corpus_lib.expand_paths(split_paths(paths))
        line_hashes, grams, self.tokens = set(), [], 0
        for path in self.files:
            for lines in _documents(path, self.enc):
                buf = []
                for line in lines:
                    norm = normalise(line)
                    if not norm:
                        continue
                    line_hashes.add(_line_hash(norm))
                    buf.extend(self.enc.encode_ordinary(' ' + norm))
                    if len(buf) >= _FLUSH:
                        grams.append(ngram_hashes(buf, ngram))
                        self.tokens += len(buf) - (ngram - 1)
                        buf = buf[len(buf) - (ngram - 1):]  # windows that span the cut
                grams.append(ngram_hashes(buf, ngram))
                self.tokens += len(buf)
        if not line_hashes:
            raise UserError(f'the corpus {paths} has no text: every file is empty or blank '
                            '(pass the files the model was trained on)')
        self.lines = np.array(sorted(line_hashes), dtype=np.uint64)
        self.grams = np.unique(np.concatenate(grams))

    def __repr__(self):
        return (f'Index({len(self.files)} files, {self.tokens} tokens, {len(self.lines)} distinct '
                f'lines, {len(self.grams)} distinct {self.ngram}-grams)')


@dataclass
class Report:
    """Counts over the checked lines (non-empty, not delimiters) and their n-grams."""
    ngram: int
    lines: int = 0
    copied_lines: int = 0
    ngrams: int = 0
    copied_ngrams: int = 0

    @property
    def line_share(self):
        """Share of checked lines that are copied; None when no line was checked."""
        return self.copied_lines / self.lines if self.lines else None

    @property
    def ngram_share(self):
        """Share of the generated n-grams found in the corpus (the memorisation rate); None when
        every line is shorter than `ngram` tokens."""
        return self.copied_ngrams / self.ngrams if self.ngrams else None

    def __add__(self, other):
        assert self.ngram == other.ngram
        return Report(self.ngram, self.lines + other.lines, self.copied_lines + other.copied_lines,
                      self.ngrams + other.ngrams, self.copied_ngrams + other.copied_ngrams)

    def to_dict(self):
        return {'ngram': self.ngram, 'lines': self.lines, 'copied_lines': self.copied_lines,
                'line_share': self.line_share, 'ngrams': self.ngrams,
                'copied_ngrams': self.copied_ngrams, 'ngram_share': self.ngram_share}

    def __str__(self):
        def share(part, whole):
            return f'{part} of {whole} ({100 * part / whole:.1f}%)' if whole else '0 of 0 (n/a)'
        return (f'copied lines: {share(self.copied_lines, self.lines)}; '
                f'{self.ngram}-token n-grams found in the corpus: '
                f'{share(self.copied_ngrams, self.ngrams)}')


class Filter:
    """Build once (from corpus paths as Index takes them, or an Index), then
    `.check(text) -> (kept_text, report)` on each generated text; `.total` sums the reports of
    every check (a rate for the checkpoint). `ngram` defaults to DEFAULT_NGRAM, or the Index's."""

    def __init__(self, corpus, *, mode='drop', ngram=None, enc=None,
                 delimiter=samples_file.SAMPLE_DELIMITER):
        self.mode = _check_mode(mode)
        if isinstance(corpus, Index):
            if ngram is not None and ngram != corpus.ngram:
                raise UserError(f'--ngram {ngram!r} differs from the index, built with '
                                f'{corpus.ngram}; rebuild the index or leave --ngram out')
            self.index = corpus
        else:
            self.index = Index(corpus, ngram=DEFAULT_NGRAM if ngram is None else ngram, enc=enc)
        self.delimiter = delimiter
        self.total = Report(self.index.ngram)

    def copied(self, lines):
        """Lines (str, no line ends) -> (bool array: copied?, Report). Blank lines and delimiter
        lines are never copied and not counted."""
        index, n = self.index, self.index.ngram
        norms = [normalise(line) if not line.startswith(self.delimiter) else '' for line in lines]
        checked = [i for i, norm in enumerate(norms) if norm]
        copied = np.zeros(len(lines), dtype=bool)
        report = Report(n, lines=len(checked))
        if not checked:
            return copied, report
        hashes = np.array([_line_hash(norms[i]) for i in checked], dtype=np.uint64)
        verbatim = _contains(index.lines, hashes)
        # All lines' tokens in one array; keep only the windows that lie inside one line.
        toks = [index.enc.encode_ordinary(' ' + norms[i]) for i in checked]
        owner = np.repeat(np.arange(len(toks)), [len(t) for t in toks])
        grams = ngram_hashes(np.concatenate([np.asarray(t, np.int64) for t in toks]), n)
        inside = owner[:len(grams)] == owner[n - 1:] if len(grams) else np.zeros(0, bool)
        grams, gram_owner = grams[inside], owner[:len(inside)][inside]
        found = _contains(index.grams, grams)
        has_found = np.bincount(gram_owner[found], minlength=len(checked)) > 0
        copied[checked] = verbatim | has_found
        report.copied_lines = int(copied.sum())
        report.ngrams, report.copied_ngrams = len(grams), int(found.sum())
        return copied, report

    def check(self, text):
        """Generated text -> (text with copied lines dropped or marked, Report of this text)."""
        lines = text.splitlines(keepends=True)
        copied, report = self.copied([line.rstrip('\r\n') for line in lines])
        out = []
        for line, is_copied in zip(lines, copied):
            if not is_copied:
                out.append(line)
            elif self.mode == 'mark':
                out.append(MARKER + line)
        self.total = self.total + report
        return ''.join(out), report


def run(corpus, samples, *, mode='drop', ngram=DEFAULT_NGRAM, output=None,
        delimiter=samples_file.SAMPLE_DELIMITER):
    """sample.py novelty (its --help says what each flag means): the samples file `samples`
    with the lines copied from `corpus` dropped or marked, to `output` or stdout; the rates go to
    stderr. Returns the Report as a dict (shares None when nothing was counted)."""
    _check_ngram(ngram), _check_mode(mode)  # before the index build, which takes a while
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise UserError(f'--output needs a file name, got {output!r}; e.g. --output '
                        'samples/novel.txt, or leave it out to write to stdout')
    text = samples_file.read(samples)
    filt = Filter(corpus, mode=mode, ngram=ngram, delimiter=delimiter)
    kept, report = filt.check(text)
    if output is None:
        sys.stdout.write(kept)
        sys.stdout.flush()
        where = 'stdout'
    else:
        paths_lib.write_text(output, kept)
        where = output
    verb = 'dropped' if mode == 'drop' else 'marked'
    print(f'novelty: {report}; {verb} {report.copied_lines} lines -> {where}', file=sys.stderr)
    return report.to_dict()

