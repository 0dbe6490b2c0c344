"""The atlas (sample.py atlas): a training run at a glance in one HTML page. Owns choosing the
checkpoints, temperatures and corpus, sampling the grid and the palimpsest through the one
compiled decoder, and each cell's copied lines; gpt2/atlas_page.py draws the page."""
import math
import os
import shlex
import sys
import tempfile
from typing import NamedTuple

import tqdm

import encoder as encoder_lib
from gpt2 import atlas_page
from gpt2 import checkpoint
from gpt2 import dataset
from gpt2 import errors
from gpt2 import novelty
from gpt2 import palimpsest
from gpt2 import paths
from gpt2 import precision
from gpt2 import prompts as prompts_lib
from gpt2 import runlog
from gpt2 import runs
from gpt2 import sampling
from gpt2.errors import UserError

DEFAULT_TEMPERATURES = (0.7, 1.0, 1.3)
DEFAULT_NSAMPLES = 2
FILENAME = 'atlas.html'  # samples/RUN/atlas.html unless --output


# ---- what the flags choose ----

def parse_temperatures(value):
    """'0.7,1.0,1.3' (fire passes a tuple, or one number) -> (0.7, 1.0, 1.3); each >= 0."""
    out = []
    for item in palimpsest.split_items(value, '--temperatures'):
        try:
            t = float(item)
        except ValueError:
            t = None
        if t is None or not math.isfinite(t) or t < 0:
            raise UserError(f'--temperatures entry {item!r} is not a number >= 0 (0 is greedy); '
                            'expected e.g. "0.7,1.0,1.3"')
        if t in out:
            raise UserError(f'--temperatures {value!r} names {t:g} twice')
        out.append(t)
    return tuple(out)


def choose(run_dir, steps):
    """The checkpoints `steps` names in a run, oldest first: 'all', or steps (60 or model-60)
    and paths, comma-separated."""
    saved = checkpoint.list_checkpoints(run_dir)
    if not saved:
        raise UserError(f'{run_dir} holds no checkpoints yet: train first (train.py '
                        '--save_every N saves one every N steps)')
    if str(steps) == 'all':
        return saved
    chosen = {palimpsest.resolve_name(n, run_dir) for n in palimpsest.split_items(steps, '--steps')}
    return sorted(chosen, key=lambda p: (checkpoint.step_of(p) is None, checkpoint.step_of(p), p))


def recorded_corpus(prefixes):
    """The datasets the checkpoints' sidecars say they were trained on, in order, once each."""
    found = []
    for prefix in prefixes:
        for d in (runs.load_meta(prefix) or {}).get('datasets', []):
            for p in d if isinstance(d, list) else [d]:
                if p not in found:
                    found.append(p)
    return found


def check_corpus(corpus, prefixes):
    """--corpus, or the datasets the run recorded, each of them there."""
    given = corpus is not None
    corpus = novelty.split_paths(corpus) if given else recorded_corpus(prefixes)
    corpus = [str(c) for c in ([corpus] if isinstance(corpus, str) else corpus)]
    if not corpus:
        raise UserError('the checkpoints record no training data (no train.py sidecar); pass '
                        '--corpus PATHS, the text the run was trained on')
    for c in corpus:
        try:
            dataset.expand_paths(c)
        except UserError as e:
            if given:
                raise
            raise UserError(f'the run records its training data as {c!r}, which is not there '
                            f'from here ({e}); relative paths are read from the folder train.py '
                            'ran in: run from there, or pass --corpus PATHS') from None
    return corpus


def check_writable(path):
    """UserError now, not after minutes of sampling, when `path` cannot be written: it is a
    folder, a folder on its way is a file, or the nearest existing folder refuses a new file (the
    probe is an unnamed temporary file, so nothing is left behind)."""
    if os.path.isdir(path):
        raise UserError(f'--output {path} is a folder; give a file name, e.g. '
                        f'{os.path.join(path, FILENAME)}')
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f'cannot write {path}: {folder} is a file, not a folder; choose another '
                        '--output')
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror} in {folder}; choose another --output '
                        'or fix its permissions') from None


# ---- the page's contents ----

class Cell(NamedTuple):
    """One checkpoint at one temperature: each sample's text, its lines' copied flags (lines as
    str.splitlines(keepends=True) cuts them, as novelty.Filter.check does) and their Report."""
    prefix: str
    temperature: float
    texts: list
    copied: list
    report: novelty.Report


class Atlas(NamedTuple):
    """Everything the page shows. `log` is log.jsonl's records (None for a run without one),
    `saved` every checkpoint of the run, `prefixes` the chosen ones, `shown` each row's prompt
    (prompt by prompt, `nsamples` rows each), `cells` prefix by temperature, `every` the
    palimpsest's tokens per checkpoint, `layers` each palimpsest's stretches (palimpsest.annotate's
    records), `command` the line that writes the page again, `traces` the compiled decode
    loop's traces, keyed by greedy or not."""
    run_dir: str
    log: list
    saved: list
    prefixes: list
    temperatures: tuple
    shown: list
    nsamples: int
    cells: list
    every: int
    layers: list
    command: str
    traces: dict

    def memorisation(self):
        """{prefix: the Report of its cells at every temperature}."""
        out = {}
        for c in self.cells:
            out[c.prefix] = out[c.prefix] + c.report if c.prefix in out else c.report
        return out


def copied_lines(filt, text):
    """(a copied flag per line of `text`, the Report), exactly as novelty.Filter.check decides."""
    lines = text.splitlines(keepends=True)
    flags, report = filt.copied([line.rstrip('\r\n') for line in lines])
    return flags.tolist(), report


def build(run_dir, prefixes, *, temperatures, texts, nsamples, length, seed, corpus,
          ngram=novelty.DEFAULT_NGRAM, top_k=sampling.DEFAULT_TOP_K, top_p=sampling.DEFAULT_TOP_P,
          every=None, batch_size=None, dtype='fp32', jit_compile=True, quiet=False, command=''):
    """Sample every checkpoint at every temperature (the same prompts and seed in each cell) and
    one palimpsest walking through them, `every` tokens each (default: an equal share of
    `length`) at the first temperature, all through one compiled loop: only the parameter tree
    changes between cells, and the temperature is a tensor. Returns the Atlas."""
    hp = palimpsest.check_same_hparams(prefixes)
    enc = encoder_lib.get_encoder(os.path.dirname(prefixes[0]))
    # prompts.rows gives each of several prompts one row; the grid wants nsamples of each.
    per = None if texts is None else [t for t in texts for _ in range(nsamples)]
    rows, shown = prompts_lib.rows(per, enc, hp, nsamples if texts is None else 1)
    filt = novelty.Filter(corpus, mode='mark', ngram=ngram)
    store = palimpsest.Store(hp, dtype=dtype)
    controls = dict(prompts=rows, batch_size=batch_size or len(rows), length=length, top_k=top_k,
                    top_p=top_p, seed=seed, decode_text=enc.decode, jit_compile=jit_compile)
    cells, traces = [], {}
    bar = tqdm.tqdm(total=len(prefixes) * len(temperatures) + 1, unit='cell', file=sys.stderr,
                    disable=quiet, leave=False)
    with bar:
        for prefix in prefixes:
            tree = store.get(prefix)
            for t in temperatures:
                bar.set_postfix_str(f'{os.path.basename(prefix)} T={t:g}')
                res = sampling.run_spans(hp, [sampling.Span.fixed(tree)], temperature=t,
                                         **controls)
                traces[t == 0] = res['tracing_count']
                marks = [copied_lines(filt, text) for text in res['texts']]
                report = sum((r for _, r in marks), novelty.Report(filt.index.ngram))
                cells.append(Cell(prefix, t, res['texts'], [f for f, _ in marks], report))
                bar.update(1)
        every = every or -(-length // len(prefixes))
        bar.set_postfix_str('palimpsest')
        res = palimpsest.run(hp, palimpsest.walk_plan(prefixes, every), store, cache='keep',
                             temperature=temperatures[0], **controls)
        traces[temperatures[0] == 0] = res['tracing_count']
        layers = [palimpsest.annotate(toks, stretches, enc.decode, text=text)[1]
                  for toks, text, stretches in zip(res['tokens'], res['texts'],
                                                   res['stretches'])]
        bar.update(1)
    return Atlas(run_dir, runlog.read(run_dir), checkpoint.list_checkpoints(run_dir),
                 list(prefixes), tuple(temperatures), shown, nsamples, cells, every, layers,
                 command, traces)


def _command(flags):
    # The sample.py line that writes this page again; flags whose value is None are left out.
    parts = ['python', 'sample.py', 'atlas']
    for name, value in flags:
        if value is not None:
            text = ','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, (list, tuple)) else str(value)
            parts += [f'--{name}', text]
    return ' '.join(shlex.quote(p) for p in parts)


def run(run_name=None, steps='all', temperatures=DEFAULT_TEMPERATURES, prompt=None,
        prompt_file=None, nsamples=DEFAULT_NSAMPLES, length=sampling.DEFAULT_LENGTH, seed=None,
        corpus=None, output=None, checkpoint_dir=paths.CHECKPOINT_DIR,
        samples_dir=paths.SAMPLES_DIR, top_k=sampling.DEFAULT_TOP_K,
        top_p=sampling.DEFAULT_TOP_P, ngram=novelty.DEFAULT_NGRAM, every=None, batch_size=None,
        dtype='fp32', xla=True, quiet=False):
    """One HTML page of a training run: its loss curve, samples from its checkpoints at several
    temperatures with the lines copied from the corpus marked, its memorisation curve, and a
    palimpsest across the checkpoints. Self-contained (inline CSS and SVG, no script), offline;
    the same flags and seed give the same page, byte for byte.

    Args:
        run_name: the run: CHECKPOINT_DIR/RUN (its checkpoints, hparams.json and log.jsonl).
        steps: all (every saved checkpoint), or steps and names, e.g. 60,200 or model-60.
        temperatures: the grid's columns, comma-separated (0 is greedy); the palimpsest is
            written at the first.
        prompt: a prompt (escapes like \\n are read); without one, samples start from
            <|endoftext|>.
        prompt_file: a file of prompts, as for plain sampling (sample.py --help).
        nsamples: samples per prompt in each cell.
        length: new tokens per sample.
        seed: the same in every cell, so cells differ only by checkpoint and temperature (printed
            when not given).
        corpus: the training text for the copied lines (files, folders, globs, comma-separated);
            default: the datasets the run's checkpoints record.
        output: the page (default SAMPLES_DIR/RUN/atlas.html), written atomically.
        checkpoint_dir: the folder of runs (checkpoint).
        samples_dir: the folder of samples (samples).
        top_k: keep the k most likely tokens (0: all).
        top_p: nucleus filter (1: off), as for plain sampling.
        ngram: tokens in a shared run that make a line copied (see sample.py novelty --help).
        every: tokens each checkpoint writes of the palimpsest (default: length / checkpoints,
            rounded up).
        batch_size: samples generated at once (default: every prompt and sample of a cell).
        dtype: the weights' decoding copy: fp32, bf16 or int8 (as for plain sampling).
        xla: compile the decode loop with XLA.
        quiet: no progress bar.
    """
    if run_name is None:
        raise UserError('give --run_name RUN: the run folder under --checkpoint_dir to draw')
    temps = parse_temperatures(temperatures)
    for t in temps:
        sampling.check_controls(length=length, temperature=t, top_k=top_k, top_p=top_p,
                                repetition_penalty=sampling.DEFAULT_PENALTY, nsamples=nsamples,
                                batch_size=1 if batch_size is None else batch_size)
    errors.check_whole('ngram', ngram, at_least=1)
    if every is not None:
        errors.check_whole('every', every, at_least=1, note='tokens per checkpoint')
    precision.check_dtype(dtype)
    texts = prompts_lib.read(prompt, prompt_file)
    run_dir = os.path.join(str(checkpoint_dir), str(run_name))
    if not os.path.isdir(run_dir):
        raise UserError(f'no run folder {run_dir} (from --run_name {run_name} under '
                        f'--checkpoint_dir {checkpoint_dir})')
    prefixes = choose(run_dir, steps)
    out = str(output) if output is not None else os.path.join(str(samples_dir), str(run_name),
                                                              FILENAME)
    check_writable(out)
    corpus = check_corpus(corpus, prefixes)
    seed = sampling.new_seed() if seed is None else int(seed)
    if not quiet:
        print(f'atlas of {run_dir}: {len(prefixes)} checkpoints x {len(temps)} temperatures, '
              f'seed {seed}', file=sys.stderr)
    command = _command([('run_name', run_name), ('checkpoint_dir', checkpoint_dir),
                        ('steps', steps), ('temperatures', temps), ('prompt', prompt),
                        ('prompt_file', prompt_file), ('nsamples', nsamples),
                        ('length', length), ('seed', seed), ('corpus', corpus),
                        ('top_k', top_k or None), ('top_p', None if top_p == 1 else top_p),
                        ('ngram', None if ngram == novelty.DEFAULT_NGRAM else ngram),
                        ('every', every), ('dtype', None if dtype == 'fp32' else dtype)])
    atlas = build(run_dir, prefixes, temperatures=temps, texts=texts, nsamples=nsamples,
                  length=length, seed=seed, corpus=corpus, ngram=ngram, top_k=top_k,
                  top_p=top_p, every=every, batch_size=batch_size, dtype=dtype,
                  jit_compile=xla, quiet=quiet, command=command)
    paths.write_text(out, atlas_page.render(atlas))
    print(f'wrote {out}', file=sys.stderr)
