"""The palimpsest sampler: one text written by checkpoints from several moments of training.

Owns the plans (schedule, cycle, walk through a run, blend), naming and loading the checkpoints
lazily within a memory budget, the annotation of who wrote which stretch of the text, and
sample.py palimpsest's output and JSON record. The decoding itself is gpt2/sampling.py's compiled
loop, given another parameter tree at each turn (a sampling.Span: no retrace).
"""
import collections
import datetime
import hashlib
import json
import os
import re
import sys
from typing import NamedTuple

import tensorflow as tf

from gpt2 import checkpoint, errors, fast, model, paths, precision
from gpt2 import prompts as prompts_lib
from gpt2 import samples_file, sampling, source
from gpt2.errors import UserError

DEFAULT_BUDGET_MB = 4096   # parameter trees kept in memory at once (124M in float32 is ~500 MB)
MARK = '[[{}]]'            # how --annotate marks the start of a stretch in text output


# ---- plans: turns [(first new-token index, checkpoint)], or a blend [(checkpoint, weight)] ----

def split_items(value, flag):
    """Comma-separated entries of a flag."""
    # fire turns "a,b" into a string but "60,200" into a tuple: accept both.
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = [s for s in str(value).split(',')]
    items = [s.strip() for s in items]
    if not items or any(not s for s in items):
        raise UserError(f'{flag} {value!r} has an empty entry; give comma-separated entries')
    return items


def parse_schedule(value):
    """'0:model-60,40:model-200' -> [(0, 'model-60'), (40, 'model-200')]."""
    out = []
    for item in split_items(value, '--schedule'):
        pos, sep, name = item.partition(':')
        if not sep or not pos.strip().isdigit() or not name.strip():
            raise UserError(f'--schedule entry {item!r} is not POSITION:CHECKPOINT; expected e.g. '
                            '"0:model-60,40:model-200" (positions count generated tokens)')
        out.append((int(pos), name.strip()))
    if out[0][0] != 0:
        raise UserError(f'--schedule must start at position 0 (got {out[0][0]}): say which '
                        'checkpoint writes the first token, e.g. "0:model-60,..."')
    positions = [p for p, _ in out]
    if positions != sorted(set(positions)):
        raise UserError(f'--schedule positions must increase, got {positions}')
    return out


def cycle_plan(names, every, length):
    """Rotate through `names`, `every` tokens each, until `length`."""
    _check_every(every)
    return [(i, names[(i // every) % len(names)]) for i in range(0, max(length, 1), every)]


def walk_plan(names, every):
    """Each of `names` in order for `every` tokens; the last one writes whatever remains."""
    _check_every(every)
    return [(i * every, n) for i, n in enumerate(names)]


def parse_blend(value):
    """'model-60:0.3,model-400:0.7' -> [('model-60', 0.3), ('model-400', 0.7)], normalised."""
    out = []
    for item in split_items(value, '--blend'):
        name, sep, w = item.rpartition(':')
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if not sep or not name or weight is None or not weight >= 0:
            raise UserError(f'--blend entry {item!r} is not CHECKPOINT:WEIGHT with a weight >= 0; '
                            'expected e.g. "model-60:0.3,model-400:0.7"')
        out.append((name, weight))
    total = sum(w for _, w in out)
    if total <= 0:
        raise UserError(f'--blend weights sum to {total}; give at least one positive weight')
    return [(n, w / total) for n, w in out]


def _check_every(every):
    errors.check_whole('every', every, at_least=1, note='tokens')


# ---- naming and loading checkpoints ----

def resolve_name(name, run_dir=None):
    """A checkpoint named by step within run_dir ('model-60' or '60') or by path -> prefix."""
    name = str(name)
    candidates = []
    if run_dir is not None:
        candidates.append(os.path.join(run_dir, f'model-{name}' if name.isdigit() else name))
    candidates.append(name)
    for c in candidates:
        if os.path.isfile(c + '.index') or os.path.isdir(c):
            return checkpoint.resolve(c)
    where = f' in {run_dir}' if run_dir else ''
    have = ''
    if run_dir is not None and os.path.isdir(run_dir):
        steps = [os.path.basename(p) for p in checkpoint.list_checkpoints(run_dir)]
        have = f' (it has: {", ".join(steps) or "nothing"})'
    raise UserError(f'no checkpoint {name!r}{where}{have}; name one by step (60 or model-60) '
                    'within --run_name, or by path')


def all_steps(run_dir):
    """Every checkpoint of a run, oldest first (for --steps all)."""
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise UserError(f'{run_dir} holds no checkpoints to walk through')
    return found


class Plan(NamedTuple):
    """What the flags ask for: `turns` [(first new-token index, prefix)] or `blend`
    [(prefix, weight)], the `prefixes` they name, a `description` for file names, and a `note`
    for the user ('' when none)."""
    turns: list
    blend: list
    prefixes: list
    description: str
    note: str = ''


def plan_from_flags(*, schedule=None, cycle=None, steps=None, every=None, blend=None,
                    run_dir=None, length):
    """The Plan that exactly one of --schedule, --cycle (with --every), --steps (with --every) or
    --blend gives; checkpoints named by step within `run_dir` or by path."""
    if sum(x is not None for x in (schedule, cycle, steps, blend)) != 1:
        raise UserError('give exactly one of --schedule, --cycle, --steps or --blend')
    name = lambda n: resolve_name(n, run_dir)  # noqa: E731
    if blend is not None:
        weighted = [(name(n), w) for n, w in parse_blend(blend)]
        return Plan(None, weighted, [p for p, _ in weighted], f'blend-{blend}')
    if schedule is not None:
        turns = [(pos, name(n)) for pos, n in parse_schedule(schedule)]
        return Plan(turns, None, [p for _, p in turns], str(schedule))
    flag = '--cycle' if cycle is not None else '--steps'
    if every is None:
        raise UserError(f'{flag} needs --every N (tokens per checkpoint)')
    if cycle is not None:
        turns = cycle_plan([name(n) for n in split_items(cycle, flag)], every, length)
        return Plan(turns, None, [p for _, p in turns], f'cycle-{cycle}-every{every}')
    if str(steps) == 'all':
        if run_dir is None:
            raise UserError('--steps all needs --run_name (the run to walk through)')
        names = all_steps(run_dir)
    else:
        names = [name(n) for n in split_items(steps, flag)]
    note = ''
    if len(names) * every > length + every:
        note = (f'{len(names)} checkpoints x {every} tokens is more than --length {length}; '
                'the later ones are not reached')
    turns = walk_plan(names, every)
    return Plan(turns, None, [p for _, p in turns], f'steps-{steps}-every{every}', note)


def check_same_hparams(prefixes):
    """Every checkpoint must have the same hparams (else one compiled loop cannot serve them);
    returns them. Reads only hparams.json and the variable shapes, not the weights."""
    first, first_hp = None, None
    for p in prefixes:
        hp = checkpoint.find_hparams(p)
        if hp is None:
            raise UserError(f'no hparams.json beside {p}; every palimpsest checkpoint needs one')
        try:
            found = tf.train.load_checkpoint(p).get_variable_to_shape_map()
        except (tf.errors.OpError, ValueError) as e:
            raise UserError(f'cannot read checkpoint {p}: {e}') from None
        checkpoint.check_names(checkpoint.shapes(hp), found, source=p, hparams=hp)
        if first_hp is None:
            first, first_hp = p, hp
        elif hp != first_hp:
            raise UserError(f'checkpoint {p} has hparams {hp.to_dict()}, but {first} has '
                            f'{first_hp.to_dict()}; a palimpsest needs checkpoints of one model '
                            'shape (the same run, or runs fine-tuned from the same model)')
    return first_hp


class Store:
    """Parameter trees loaded on first use as decoding copies of `dtype` (gpt2/precision.py) and
    dropped least-recently-used past a byte budget, which counts the copies' own bytes: int8
    copies let about four times as many checkpoints stay in memory as fp32."""

    def __init__(self, hparams, budget_mb=DEFAULT_BUDGET_MB, dtype='fp32'):
        self.hparams = hparams
        self.budget = budget_mb * (1 << 20)
        self.dtype = precision.check_dtype(dtype)
        self.trees = collections.OrderedDict()
        self.loads = 0

    def copy_bytes(self):
        """The bytes one checkpoint's decoding copy holds."""
        return precision.copy_bytes(model.spec(self.hparams), self.dtype)

    def get(self, prefix):
        if prefix in self.trees:
            self.trees.move_to_end(prefix)
            return self.trees[prefix][0]
        params, _, _ = checkpoint.load_params(prefix, self.hparams)
        tree = fast.for_decoding(params, self.dtype)
        del params
        size = precision.nbytes(tree)
        while self.trees and sum(n for _, n in self.trees.values()) + size > self.budget:
            self.trees.popitem(last=False)  # the least recently used
        self.trees[prefix] = (tree, size)
        self.loads += 1
        return tree


# ---- running a plan ----

def sample(hparams, turns, store, s, *, prompts, cache='keep', blend=None, **options):
    """Sample with checkpoints taking their turns, as settings.SampleSettings `s` say (with a
    seed), through sampling.run_spans (`options`: its stops, decode_text, jit_compile, progress).

    `turns` is [(first new-token index, prefix)] sorted from 0, or None with `blend`
    [(prefix, weight)]. `cache` 'keep' leaves the keys/values earlier checkpoints wrote in the
    cache (later tokens read the text as those moments understood it), 'recompute' re-reads the
    text with each new checkpoint. Returns run_spans' dict and 'stretches', those of a sample
    being [(first token, end token, prefix)]: who wrote which of its tokens.
    """
    if cache not in ('keep', 'recompute'):
        raise UserError(f'--cache must be keep or recompute, got {cache!r}')
    if blend:
        prefixes = [p for p, _ in blend]
        spans = [sampling.Span(0, lambda: tuple(store.get(p) for p in prefixes),
                               tuple(w for _, w in blend))]
        turns = [(0, '+'.join(f'{_short(p)}:{w:g}' for p, w in blend))]
    else:
        spans = [sampling.Span(pos, _getter(store, p)) for pos, p in turns]
    out = sampling.run_spans(hparams, spans, s, prompts=prompts,
                             recompute=cache == 'recompute', **options)
    ends = [pos for pos, _ in turns[1:]] + [s.length]
    out['stretches'] = [[(a, min(b, len(toks)), p) for (a, p), b in zip(turns, ends)
                         if a < len(toks)] for toks in out['tokens']]
    return out


def _getter(store, prefix):
    return lambda: (store.get(prefix),)


def _short(prefix):
    return os.path.basename(prefix)


def annotate(tokens, stretches, decode_text, *, text=None):
    """(text with MARK before each stretch, [{checkpoint, tokens [a, b), chars [a, b), text}])."""
    parts, records = [], []
    full = text if text is not None else decode_text(tokens)
    for a, b, prefix in stretches:
        ca = len(decode_text(tokens[:a]))
        cb = len(full) if b >= len(tokens) else len(decode_text(tokens[:b]))
        cb = min(cb, len(full))
        ca = min(ca, cb)
        piece = full[ca:cb]
        parts.append(MARK.format(_short(prefix)) + piece)
        records.append({'checkpoint': prefix, 'tokens': [a, b], 'chars': [ca, cb],
                        'text': piece})
    return ''.join(parts), records


def output_name(kind, description, *, seed, temperature):
    """A file name recording what regenerates the text: plan, seed and temperature."""
    slug = re.sub(r'[^A-Za-z0-9._+-]+', '_', description).strip('_')
    if len(slug) > 80:
        slug = slug[:60] + '-' + hashlib.sha1(description.encode()).hexdigest()[:10]
    return f'{kind}-{slug}-seed{seed}-t{temperature:g}'


def write(path, texts, meta):
    """The samples file at `path` and its JSON record beside it (`meta`), both atomically;
    returns the JSON's path."""
    paths.write_text(path, samples_file.format_samples(texts))
    json_path = os.path.splitext(path)[0] + '.json'
    paths.write_text(json_path, json.dumps(meta, indent=2, ensure_ascii=False) + '\n')
    return json_path


# ---- sample.py palimpsest ----

def run(s, *, schedule, cycle, steps, every, blend, cache, annotated, budget_mb):
    """sample.py palimpsest (its --help says what each flag means; `annotated` is --annotate):
    the plan the flags give, sampled as settings.SampleSettings `s` say, printed, and written to
    --output or a name in --samples_dir that records the plan, with its JSON record beside it."""
    texts = prompts_lib.read(s.prompt, s.prompt_file)
    plan = plan_from_flags(schedule=schedule, cycle=cycle, steps=steps, every=every, blend=blend,
                           run_dir=source.run_folder(s), length=s.length)
    if plan.note and not s.quiet:
        print(f'note: {plan.note}', file=sys.stderr)
    hparams = check_same_hparams(plan.prefixes)
    store = Store(hparams, budget_mb, s.dtype)
    if plan.blend:
        need = len(plan.blend) * store.copy_bytes()
        if need > store.budget:
            raise UserError(f'--blend needs all {len(plan.blend)} checkpoints in memory at once '
                            f'({need >> 20} MB in {s.dtype}), more than --budget_mb {budget_mb}; '
                            'raise it, or take a narrower --dtype')
    enc = source.encoder(plan.prefixes[0])
    stop_ids, stop_strings = prompts_lib.stops(s.stop, enc)
    s = sampling.seeded(s)
    rows, shown = prompts_lib.rows(texts, enc, hparams, s.nsamples)
    update, close = sampling.progress_bar(len(rows) * s.length, s.quiet)
    try:
        res = sample(hparams, plan.turns, store, s, prompts=rows, cache=cache, blend=plan.blend,
                     stop_ids=stop_ids, stop_strings=stop_strings, decode_text=enc.decode,
                     jit_compile=s.xla, progress=update)
    finally:
        close()
    bodies, records = [], []
    for i, (toks, text, stretches) in enumerate(zip(res['tokens'], res['texts'],
                                                    res['stretches'])):
        if annotated:
            text, rec = annotate(toks, stretches, enc.decode, text=text)
            # 'spans': the record's key for the stretches since its first version
            records.append({'sample': i + 1, 'prompt': shown[i], 'spans': rec})
        bodies.append((shown[i] + text) if s.include_prompt else text)
    samples_file.print_samples(bodies, quiet=s.quiet)
    _write_run(s, plan, cache, bodies, records if annotated else None)


def _write_run(s, plan, cache, bodies, records):
    # The samples file and its JSON record: what regenerates the text (and, annotated, who wrote
    # which stretch of each sample).
    name = output_name(f'palimpsest-{cache}', plan.description, seed=s.seed,
                       temperature=s.temperature)
    path = s.output or os.path.join(s.samples_dir, name + '.txt')
    meta = {'plan': plan.description, 'cache': cache, 'dtype': s.dtype, 'seed': s.seed,
            'temperature': s.temperature, 'top_k': s.top_k, 'top_p': s.top_p,
            'repetition_penalty': s.repetition_penalty, 'length': s.length,
            'written': datetime.datetime.now().isoformat(timespec='seconds'),
            'checkpoints': plan.prefixes}
    if records is not None:
        meta['samples'] = records
    json_path = write(path, bodies, meta)
    print(f'wrote {path} and {json_path} (seed {s.seed})', file=sys.stderr)
