#!/usr/bin/env python3
"""Encode text corpora into GPT-2 token files (.npz) for train.py, or mix several corpora."""
import sys
import time

from gpt2 import cli, paths
from gpt2 import encoding as encoding_lib
from gpt2 import mixture as mixture_lib
from gpt2.errors import UserError


def _report(stats, output, seconds, text_out=None):
    mb = stats['bytes'] / 1e6
    print(f'{output}: {stats["tokens"]:,} tokens in {stats["chunks"]} chunk(s) from '
          f'{stats["files"]} file(s), {mb:.1f} MB in {seconds:.1f} s '
          f'({mb / max(seconds, 1e-9):.1f} MB/s)' + (f'; mixed text in {text_out}' if text_out
                                                      else ''))


def _model_dir(model_name, models_dir):
    # --model_name's folder, whose vocabulary encodes the text (None: GPT-2's built-in one)
    return paths.model_dir(model_name, models_dir) if model_name else None


def encode(*files, combine=encoding_lib.COMBINE, separator=True, eot_in_text=True, column=0,
           header=True, encoding='utf-8', errors='strict', model_name=None,
           models_dir=paths.MODELS_DIR, workers=None, compress=True, quiet=False):
    """Encode INPUT... into OUTPUT.npz (the last argument) of GPT-2 tokens.

    Usage: encode.py INPUT... OUTPUT.npz [flags]
           encode.py mix SOURCE... OUTPUT.npz [flags]   (see: encode.py mix --help)

    INPUT: text files, folders (read recursively, hidden files skipped), globs (quote them),
    .csv files (one document per row) and token .npz files (their chunks are copied as they are).
    Each text file is one document; documents are separated by <|endoftext|> (id 50256).
    Large files are read in pieces, so memory stays flat however big the corpus.

    OUTPUT.npz: a NumPy .npz with one 1-D uint16 array of token ids per chunk (arr_0, arr_1, ...),
    readable by train.py, gpt2.dataset.load_npz and nshepperd's train.py.

    Args:
        combine: close a chunk once it holds this many characters; smaller files are joined into
            one chunk (nshepperd's --combine). Training windows never cross a chunk boundary.
        separator: put <|endoftext|> between the documents of a chunk (--noseparator: none).
        eot_in_text: a literal <|endoftext|> in the text is the single token 50256, so a file of
            posts separated by it becomes separate documents (--noeot_in_text: encode it as the
            plain characters, 5 ordinary tokens).
        column: the .csv column holding the text: an index from 0, or a header name.
        header: the .csv files start with a header row, which is skipped (--noheader: they
            do not).
        encoding: the text encoding of the inputs (a Python codec name: utf-8, latin-1, cp1252).
        errors: undecodable bytes: strict (stop with the file and byte offset), replace (U+FFFD)
            or ignore.
        model_name: use this model's vocabulary (MODELS_DIR/MODEL_NAME/encoder.json, vocab.bpe)
            if it has its own; default, and for any model folder without them: GPT-2's built-in
            vocabulary, which every released GPT-2 model shares.
        models_dir: the folder holding model folders.
        workers: processes encoding in parallel, this one included (default: every core).
        compress: deflate the .npz (--nocompress: store, faster to write, about 2x larger).
        quiet: no progress bar or summary.
    """
    if not files:
        raise UserError('usage: encode.py INPUT... OUTPUT.npz (see --help)')
    *inputs, output = map(str, files)
    if not inputs:
        raise UserError(f'no inputs before the output {output}: '
                        'usage: encode.py INPUT... OUTPUT.npz')
    start = time.perf_counter()
    stats = encoding_lib.encode_files(
        inputs, output, model_dir=_model_dir(model_name, models_dir), combine=combine,
        separator=separator, eot_in_text=eot_in_text, column=column, header=header,
        encoding=encoding, errors=errors, workers=workers, compress=compress, progress=not quiet)
    if not quiet:
        _report(stats, output, time.perf_counter() - start)


def mix(*files, unit='line', min_chars=1, max_chars=None, strip_punct=False, strip_digits=False,
        until='longest', text_out=None, eot_in_text=True, encoding='utf-8', errors='strict',
        model_name=None, models_dir=paths.MODELS_DIR, workers=None, compress=True,
        quiet=False):
    """Interleave SOURCE... unit by unit into one text, and encode it into OUTPUT.npz.

    Usage: encode.py mix SOURCE... OUTPUT.npz [flags]

    Each SOURCE (a text file, folder or glob) is cut into units; the mixture takes the first unit
    of each source in turn, then the second of each, and so on (round-robin), and is encoded as
    one document. Units are joined by a newline (lines), a space (sentences) or a blank line
    (paragraphs); write the result with --text_out to read what the model will see.

    Args:
        unit: line, sentence (ends at . ! ? or ... before whitespace; whitespace inside it is
            collapsed to single spaces) or paragraph (lines up to a blank line).
        min_chars: drop units shorter than this (counted after stripping).
        max_chars: drop units longer than this (they are dropped, not cut).
        strip_punct: remove punctuation (Unicode category P) from every unit.
        strip_digits: remove decimal digits from every unit.
        until: longest (a source that runs out drops out; nothing is lost) or shortest (stop
            when the first source runs out; every source gives the same number of units).
        text_out: also write the mixed text to this file.
        eot_in_text, encoding, errors, model_name, models_dir, workers, compress, quiet: as for
            encode.py.
    """
    if len(files) < 2:
        raise UserError('usage: encode.py mix SOURCE... OUTPUT.npz (see --help)')
    *sources, output = map(str, files)
    start = time.perf_counter()
    stats = mixture_lib.encode_mixture(
        sources, output, unit=unit, min_chars=min_chars, max_chars=max_chars,
        strip_punct=strip_punct, strip_digits=strip_digits, until=until, text_out=text_out,
        encoding_name=encoding, errors=errors, workers=workers, compress=compress,
        progress=not quiet, model_dir=_model_dir(model_name, models_dir),
        eot_in_text=eot_in_text)
    if not quiet:
        _report(stats, output, time.perf_counter() - start, text_out)


if __name__ == '__main__':
    # `encode.py mix ...` is the mixture command; anything else is the plain form. (A file
    # named "mix" is still an input as ./mix.)
    if sys.argv[1:2] == ['mix']:
        del sys.argv[1]
        cli.main(mix, name='encode.py mix')
    else:
        cli.main(encode, name='encode.py')
