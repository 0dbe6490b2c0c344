"""Corpus mixtures: several sources cut into units (lines, sentences or paragraphs), filtered,
and interleaved round-robin into one text, streamed so memory stays flat."""
import contextlib
import os

import regex

from gpt2 import corpus
from gpt2 import encoding
from gpt2 import errors as errors_lib
from gpt2 import paths
from gpt2.errors import UserError

UNITS = ('line', 'sentence', 'paragraph')
JOINERS = {'line': '\n', 'sentence': ' ', 'paragraph': '\n\n'}  # between units in the mixture
UNTIL = ('longest', 'shortest')
# A sentence ends at . ! ? or … (possibly with closing quotes or brackets) before whitespace.
_SENTENCE_END = regex.compile(r'(?<=[.!?…]+["\'”’)\]]*)\s+')
_PUNCT = regex.compile(r'\p{P}+')
_DIGITS = regex.compile(r'\p{Nd}+')
_SPACE_RUN = regex.compile(r'[^\S\n]{2,}')


def _lines(path, **kw):
    """The lines of a file without their line ends, read in blocks."""
    rest = ''
    for text, _ in corpus.read_blocks(path, **kw):
        lines = (rest + text).split('\n')
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _paragraphs(path, **kw):
    """Runs of non-blank lines, joined by newlines."""
    para = []
    for line in _lines(path, **kw):
        if line.strip():
            para.append(line.rstrip())
        elif para:
            yield '\n'.join(para)
            para = []
    if para:
        yield '\n'.join(para)


def units(path, unit, **kw):
    """The units of one file. Lines and paragraphs keep their indentation; sentences are found
    inside paragraphs (so none spans a blank line) and have their whitespace collapsed to single
    spaces, as a hard-wrapped sentence becomes one line. The sentence rule is simple: it also
    ends a sentence after "Mr." or "e.g."."""
    if unit == 'line':
        yield from (line.rstrip() for line in _lines(path, **kw))
    elif unit == 'paragraph':
        yield from _paragraphs(path, **kw)
    else:
        for para in _paragraphs(path, **kw):
            for sentence in _SENTENCE_END.split(para):
                yield ' '.join(sentence.split())


def clean(text, *, strip_punct=False, strip_digits=False):
    """Remove Unicode punctuation and/or decimal digits, then runs of spaces they leave behind and
    trailing whitespace (a unit always ends with a visible character, see corpus.cut_point)."""
    if strip_punct:
        text = _PUNCT.sub('', text)
    if strip_digits:
        text = _DIGITS.sub('', text)
    if strip_punct or strip_digits:
        text = '\n'.join(_SPACE_RUN.sub(' ', line).rstrip() for line in text.split('\n'))
        text = text.strip('\n')
    return text.rstrip()


def source_units(source, unit, *, min_chars=1, max_chars=None, strip_punct=False,
                 strip_digits=False, **kw):
    """Cleaned units of a source (a file, folder or glob), keeping those of min_chars..max_chars
    characters (measured after cleaning; longer units are dropped, not cut)."""
    for path in corpus.expand_paths(source):
        if path.lower().endswith('.npz'):
            raise UserError(f'{path}: a mixture needs text sources, not token files')
        for u in units(path, unit, **kw):
            u = clean(u, strip_punct=strip_punct, strip_digits=strip_digits)
            if len(u) >= max(min_chars, 1) and (max_chars is None or len(u) <= max_chars):
                yield u


def interleave(streams, *, until='longest'):
    """Round-robin: the first unit of each stream, then the second of each, ... A stream that runs
    out drops out ('longest': go on until all are spent) or ends the mixture ('shortest')."""
    streams = [iter(s) for s in streams]
    while streams:
        alive = []
        for s in streams:
            u = next(s, None)
            if u is None:
                if until == 'shortest':
                    return
                continue
            alive.append(s)
            yield u
        streams = alive


def check_options(sources, unit, min_chars, max_chars, until):
    if len(sources) < 1:
        raise UserError('mix needs at least one source (usually two or more) before OUTPUT.npz')
    errors_lib.check_choice('unit', unit, UNITS)
    errors_lib.check_choice('until', until, UNTIL)
    errors_lib.check_whole('min_chars', min_chars)
    if max_chars is not None and not errors_lib.is_whole(max_chars, max(min_chars, 1)):
        raise UserError(f'--max_chars={max_chars!r}: expected a whole number >= --min_chars '
                        f'({min_chars}) and >= 1')


def mixture(sources, *, unit='line', min_chars=1, max_chars=None, strip_punct=False,
            strip_digits=False, until='longest', encoding_name='utf-8', errors='strict'):
    """The mixed units, in order (each source: a file, folder or glob)."""
    check_options(sources, unit, min_chars, max_chars, until)
    for s in sources:
        corpus.expand_paths(s)  # a missing source fails now, not after minutes of mixing
    kw = dict(min_chars=min_chars, max_chars=max_chars, strip_punct=strip_punct,
              strip_digits=strip_digits, encoding=encoding_name, errors=errors)
    return interleave([source_units(s, unit, **kw) for s in sources], until=until)


def mixture_items(mixed, unit, *, text_out=None, piece_chars=corpus.PIECE_CHARS):
    """The mixture as one document of encoding items, each piece cut between two units (always a
    safe cut: a unit ends with a visible character and the joiner is whitespace). The text,
    joiners and a final newline included, is also written to the open file `text_out`."""
    joiner = JOINERS[unit]
    piece, size, first = [], 0, True
    for u in mixed:
        text = u if first else joiner + u
        first = False
        piece.append(text)
        size += len(text)
        if size >= piece_chars:
            yield _piece(piece, text_out)
            piece, size = [], 0
    if first:
        raise UserError('the mixture is empty: no unit of the sources is left after the filters '
                        '(--min_chars, --max_chars, --strip_punct, --strip_digits)')
    piece.append('\n')
    yield _piece(piece, text_out, end=True)


def _piece(parts, text_out, end=False):
    text = ''.join(parts)
    if text_out is not None:
        text_out.write(text)
    nbytes = len(text.encode('utf-8'))
    return corpus.Item(corpus.TEXT, text, nbytes, doc_end=end)


def encode_mixture(sources, output, *, unit='line', min_chars=1, max_chars=None,
                   strip_punct=False, strip_digits=False, until='longest', text_out=None,
                   encoding_name='utf-8', errors='strict', workers=None, compress=True,
                   progress=True, piece_chars=corpus.PIECE_CHARS, **kw):
    """Mix `sources` and encode the mixture (one document) into the token .npz `output`; with
    `text_out`, also write the mixed text there (atomically, like the .npz).
    `kw` goes to encoding.encode_items (model_dir, eot_in_text). -> stats dict."""
    sources = [str(s) for s in sources]
    mixed = mixture(sources, unit=unit, min_chars=min_chars, max_chars=max_chars,
                    strip_punct=strip_punct, strip_digits=strip_digits, until=until,
                    encoding_name=encoding_name, errors=errors)
    files = [p for s in sources for p in corpus.expand_paths(s)]
    encoding.check_output(output, files)
    if text_out is not None:
        text_out = str(text_out)
        folder = os.path.dirname(os.path.abspath(text_out))
        if not os.path.isdir(folder):
            raise UserError(f'the --text_out folder {folder} does not exist; create it first')
        if any(os.path.realpath(p) == os.path.realpath(text_out) for p in files):
            raise UserError(f'--text_out={text_out} is also a source; choose another name')
    workers = encoding.check_workers(workers)
    total = sum(os.path.getsize(p) for p in files)
    if total <= piece_chars:
        workers = 1
    with contextlib.ExitStack() as stack:
        out = None if text_out is None else stack.enter_context(
            paths.writing(text_out, text=True))
        with encoding.progress_bar(total, 'mixing', progress) as update:
            items = mixture_items(mixed, unit, text_out=out, piece_chars=piece_chars)
            stream = encoding.encode_items(items, workers=workers, piece_chars=piece_chars,
                                           combine=0, progress=update, **kw)
            chunks, tokens = encoding.write_npz(stream, output, compress=compress)
    return {'chunks': chunks, 'tokens': tokens, 'bytes': total, 'files': len(files)}
