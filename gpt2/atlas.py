"""The atlas (sample.py atlas): a training run at a glance in one HTML page. Owns choosing the
checkpoints, temperatures and corpus, sampling the grid and the palimpsest through the one
compiled decoder, and each cell's copied lines; gpt2/atlas_page.py draws the page."""
import dataclasses
import math
import os
import shlex
import sys
import tempfile
from typing import NamedTuple

import tqdm

from gpt2 import atlas_page
from gpt2 import checkpoint
from gpt2 import corpus as corpus_lib
from gpt2 import errors
from gpt2 import novelty
from gpt2 import palimpsest
from gpt2 import paths
from gpt2 import prompts as prompts_lib
from gpt2 import runlog
from gpt2 import runs
from gpt2 import sampling
from gpt2 import source
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
            corpus_lib.expand_paths(c)
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


def build(run_dir, prefixes, s, *, temperatures, texts, corpus, ngram, every, batch_size,
          command=''):
    """Sample every checkpoint at every temperature (the same prompts and seed in each cell) and
    one palimpsest walking through them, `every` tokens each (None: an equal share of
    `length`) at the first temperature, all through one compiled loop: only the parameter tree
    changes between cells, and the temperature is a tensor. `s`: the settings.SampleSettings
    (with a seed), whose temperature the cells replace; `batch_size` None: every row of a cell
    at once. Returns the Atlas."""
    hp = palimpsest.check_same_hparams(prefixes)
    enc = source.encoder(prefixes[0])
    # prompts.rows gives each of several prompts one row; the grid wants nsamples of each.
    per = None if texts is None else [t for t in texts for _ in range(s.nsamples)]
    rows, shown = prompts_lib.rows(per, enc, hp, s.nsamples if texts is None else 1)
    filt = novelty.Filter(corpus, mode='mark', ngram=ngram)
    store = palimpsest.Store(hp, dtype=s.dtype)
    s = dataclasses.replace(s, batch_size=batch_size or len(rows))
    options = dict(prompts=rows, decode_text=enc.decode, jit_compile=s.xla)
    cells, traces = [], {}
    bar = tqdm.tqdm(total=len(prefixes) * len(temperatures) + 1, unit='cell', file=sys.stderr,
                    disable=s.quiet, leave=False)
    with bar:
        for prefix in prefixes:
            tree = store.get(prefix)
            for t in temperatures:
                bar.set_postfix_str(f'{os.path.basename(prefix)} T={t:g}')
                res = sampling.run_spans(hp, [sampling.Span.fixed(tree)],
                                         dataclasses.replace(s, temperature=t), **options)
                traces[t == 0] = res['tracing_count']
                marks = [copied_lines(filt, text) for text in res['texts']]
                report = sum((r for _, r in marks), novelty.Report(filt.index.ngram))
                cells.append(Cell(prefix, t, res['texts'], [f for f, _ in marks], report))
                bar.update(1)
        every = every or -(-s.length // len(prefixes))
        bar.set_postfix_str('palimpsest')
        res = palimpsest.sample(hp, palimpsest.walk_plan(prefixes, every), store,
                                dataclasses.replace(s, temperature=temperatures[0]),
                                cache='keep', **options)
        traces[temperatures[0] == 0] = res['tracing_count']
        layers = [palimpsest.annotate(toks, stretches, enc.decode, text=text)[1]
                  for toks, text, stretches in zip(res['tokens'], res['texts'],
                                                   res['stretches'])]
        bar.update(1)
    return Atlas(run_dir, runlog.read(run_dir), checkpoint.list_checkpoints(run_dir),
                 list(prefixes), tuple(temperatures), shown, s.nsamples, cells, every, layers,
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


def run(s, *, steps, temperatures, corpus, ngram, every, batch_size):
    """sample.py atlas (its --help says what each flag means): the page of --run_name's
    checkpoints `steps` at `temperatures`, written to --output (default
    SAMPLES_DIR/RUN/atlas.html); `s` the settings.SampleSettings of the other flags."""
    if s.run_name is None:
        raise UserError('give --run_name RUN: the run folder under --checkpoint_dir to draw')
    temps = parse_temperatures(temperatures)
    if batch_size is not None:
        errors.check_whole('batch_size', batch_size, at_least=1)
    errors.check_whole('ngram', ngram, at_least=1)
    if every is not None:
        errors.check_whole('every', every, at_least=1, note='tokens per checkpoint')
    texts = prompts_lib.read(s.prompt, s.prompt_file)
    run_dir = source.run_folder(s)
    prefixes = choose(run_dir, steps)
    out = str(s.output) if s.output is not None else os.path.join(
        str(s.samples_dir), str(s.run_name), FILENAME)
    check_writable(out)
    corpus = check_corpus(corpus, prefixes)
    s = sampling.seeded(s)
    if not s.quiet:
        print(f'atlas of {run_dir}: {len(prefixes)} checkpoints x {len(temps)} temperatures, '
              f'seed {s.seed}', file=sys.stderr)
    command = _command([('run_name', s.run_name), ('checkpoint_dir', s.checkpoint_dir),
                        ('steps', steps), ('temperatures', temps), ('prompt', s.prompt),
                        ('prompt_file', s.prompt_file), ('nsamples', s.nsamples),
                        ('length', s.length), ('seed', s.seed), ('corpus', corpus),
                        ('top_k', s.top_k or None), ('top_p', None if s.top_p == 1 else s.top_p),
                        ('ngram', None if ngram == novelty.DEFAULT_NGRAM else ngram),
                        ('every', every), ('dtype', None if s.dtype == 'fp32' else s.dtype)])
    atlas = build(run_dir, prefixes, s, temperatures=temps, texts=texts, corpus=corpus,
                  ngram=ngram, every=every, batch_size=batch_size, command=command)
    paths.write_text(out, atlas_page.render(atlas))
    print(f'wrote {out}', file=sys.stderr)
