#!/usr/bin/env python3
"""Sample from GPT-2: unconditional, prompted, interactive; score a text; the palimpsest sampler;
the atlas of a run."""
import dataclasses
import datetime
import os
import sys

from gpt2 import cli

cli.quiet_tensorflow()

from gpt2 import atlas as atlas_lib  # noqa: E402
from gpt2 import checkpoint, novelty as novelty_lib, palimpsest as palimpsest_lib  # noqa: E402
from gpt2 import fast, paths, prompts, samples_file, sampling, scoring, settings  # noqa: E402
from gpt2.errors import UserError  # noqa: E402


# ---- shared pieces of the subcommands ----

def _load_source(s):
    """The path that --model_name, --run_name or --checkpoint names (124M by default)."""
    if s.checkpoint is not None:
        return str(s.checkpoint)
    if s.run_name is not None:
        return os.path.join(s.checkpoint_dir, str(s.run_name))
    return paths.model_dir('124M' if s.model_name is None else s.model_name, s.models_dir)


def _encoder(prefix):
    import encoder
    return encoder.get_encoder(os.path.dirname(prefix) or '.')


def _load(s):
    params, hparams, prefix = checkpoint.load_params(_load_source(s))
    return params, hparams, prefix, _encoder(prefix)


def _show(i, body, quiet):
    if not quiet:
        print(samples_file.SAMPLE_HEADER.format(i + 1))
    print(body)


def sample(*, interactive=False, novel_against=None, novel_mode='mark',
           ngram=novelty_lib.DEFAULT_NGRAM, **flags):
    """Generate text. Subcommands: `sample.py score|palimpsest|novelty|atlas --help`.

    Args:
        model_name: sample from MODELS_DIR/NAME (default 124M).
        run_name: ... or from the latest checkpoint of CHECKPOINT_DIR/RUN.
        checkpoint: ... or from a checkpoint prefix, run folder or model folder (one of the three).
        models_dir: the folder of models (models).
        checkpoint_dir: the folder of runs (checkpoint).
        prompt: a prompt (escapes like \\n are read); without one, samples start from
            <|endoftext|> (unconditional).
        prompt_file: a file of prompts, one per block when blank lines (or lines of spaces)
            separate blocks, else one per line; different prompts share a batch, each gets
            --nsamples samples.
        interactive: read a prompt from stdin, print samples, repeat (Ctrl-D ends); answer n uses
            seed S + n.
        nsamples: samples per prompt.
        batch_size: samples generated at once.
        length: new tokens per sample; past n_ctx the context window slides (the model then reads
            the last 3/4 of n_ctx tokens).
        temperature: divides the logits; 0 is greedy (the most likely token every time).
        top_k: keep the k most likely tokens (0: all).
        top_p: then keep the tokens whose more likely tokens hold less than p, as Hugging Face's
            TopPLogitsWarper does (1: all); ties with the last one kept stay. Order: repetition
            penalty, temperature, top_k, top_p on what top_k kept; both may be on.
        repetition_penalty: CTRL's rule on tokens already in the text (logit / r if positive,
            logit * r if negative; 1: off; CTRL used 1.2).
        seed: makes the samples reproducible, whatever --batch_size (printed when not given).
        stop: a string, or a list like '["a", "b"]'; a sample ends where it first writes one (the
            stop text is not kept); '<|endoftext|>' stops on that token.
        include_prompt: print the prompt before each sample.
        output: also write the samples to this file (samples separated by delimiter lines).
        quiet: no progress bar or delimiters on stdout.
        xla: compile the decode loop with XLA (--noxla: TF's kernels; see BENCHMARKS.md).
        dtype: the type the weights are held in for decoding: fp32 (as trained), bf16 (half the
            memory) or int8 (a quarter, and faster at batch 1; README "Precision" has their
            error and speed).
        novel_against: training text (files, folders, globs, comma-separated): lines copied from
            it are marked or dropped (see `sample.py novelty --help`); the copy rate goes to stderr.
        novel_mode: mark (prefix copied lines with '[copied] ') or drop.
        ngram: tokens in a shared run that make a line copied.
    """
    s = settings.SampleSettings(**flags)
    texts = prompts.read(s.prompt, s.prompt_file)  # bad input fails before the weights load
    novel = (novelty_lib.Filter(novel_against, mode=novel_mode, ngram=ngram)
             if novel_against else None)
    params, hparams, prefix, enc = _load(s)
    params = fast.for_decoding(params, s.dtype)
    stop_ids, stop_strings = prompts.stops(s.stop, enc)
    s = sampling.seeded(s)
    print(f'checkpoint {prefix}, seed {s.seed}', file=sys.stderr)
    spans = [sampling.Span.fixed(params)]

    def once(prompt_texts, seed, out_file):
        rows, shown = prompts.rows(prompt_texts, enc, hparams, s.nsamples)
        update, close = sampling.progress_bar(len(rows) * s.length, s.quiet)
        try:
            res = sampling.run_spans(
                hparams, spans, dataclasses.replace(s, seed=seed), prompts=rows,
                stop_ids=stop_ids, stop_strings=stop_strings, decode_text=enc.decode,
                jit_compile=s.xla, progress=update)
        finally:
            close()
        chunks = []
        for i, text in enumerate(res['texts']):
            body = (shown[i] + text) if s.include_prompt else text
            if novel:
                body, _ = novel.check(body)
            chunks.append(body)
            _show(i, body, s.quiet)
        if out_file:
            paths.write_text(out_file, samples_file.format_samples(chunks))
        return chunks

    if not interactive:
        once(texts, s.seed, s.output)
        if novel:
            print(f'novelty: {novel.total}', file=sys.stderr)
        return
    n = 0
    while True:
        try:
            line = input('Model prompt >>> ')
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            print('Prompt should not be empty!', file=sys.stderr)
            continue
        once([prompts.unescape(line)], s.seed + n, None)
        n += 1


def score(*, file=None, text=None, tokens=False, **flags):
    """Score a text: mean loss (nats per token), perplexity and bits per byte under a checkpoint.

    --file F or --text T (one of them); --tokens also prints each token's log-probability.
    The first token is conditioned on <|endoftext|>; long texts are read in windows overlapping by
    half of n_ctx. Weights: --model_name, --run_name or --checkpoint and --dtype as for sampling.
    """
    s = settings.SampleSettings(**flags)
    if (file is None) == (text is None):
        raise UserError('give one of --file or --text to score')
    if file is not None:
        if not os.path.isfile(file):
            raise UserError(f'file to score {file} does not exist')
        with open(file, encoding='utf-8', errors='replace') as f:
            text = f.read()
    text = str(text)
    params, hparams, prefix, enc = _load(s)
    ids = enc.encode(text)
    if not ids:
        raise UserError('the text to score is empty')
    lp = scoring.score(hparams, fast.for_decoding(params, s.dtype), ids,
                       context_token=sampling.start_token(hparams))
    if tokens:
        for t, v in zip(ids, lp):
            print(f'{v:10.4f}\t{enc.decode([t])!r}')
    m = scoring.summary(lp, len(text.encode('utf-8')))
    print(f'checkpoint {prefix}: {m["tokens"]} tokens, loss {m["loss"]:.4f} nats/token, '
          f'perplexity {m["perplexity"]:.3f}, {m["bits_per_byte"]:.4f} bits/byte')


def palimpsest(*, schedule=None, cycle=None, steps=None, every=None, blend=None, cache='keep',
               annotate=False, budget_mb=palimpsest_lib.DEFAULT_BUDGET_MB, **flags):
    """One text written by checkpoints from several moments of training.

    Plans (one of):
      --schedule "0:model-60,40:model-200,80:model-400": the generated-token position at which
        each checkpoint takes over (the first at 0).
      --cycle model-60,model-200 --every 20: rotate through the checkpoints every 20 tokens.
      --steps all --every 20 (or --steps 60,200,400): walk through the run's checkpoints in order,
        20 tokens each; the last one writes whatever remains.
      --blend "model-60:0.3,model-400:0.7": every token drawn from the weighted mixture of the
        checkpoints' next-token distributions (weights are normalised).
    Checkpoints are named by step within --run_name (60 or model-60) or by path (any run), and
    must share hparams.
    --cache keep (default): on a swap, the keys and values the earlier checkpoints wrote stay in
      the cache: the new checkpoint reads the text so far as the earlier moments understood it
      (the layers stay underneath; the true palimpsest). --cache recompute: the new checkpoint
      re-reads the whole text with its own weights, as if it had written it all.
    --annotate: mark each span in the text with [[checkpoint]] and write a JSON file of spans.
    Output goes to --samples_dir (samples/) under a name recording the plan, seed and
    temperature (or --output FILE), with a JSON record beside it; --budget_mb caps the weights
    held in memory at once, counted in --dtype (int8 copies are a quarter of fp32's, so about
    four times as many checkpoints stay loaded).
    Prompts, controls (--nsamples ... --stop), --include_prompt, --quiet, --xla and --dtype: as
    for plain sampling, see `sample.py --help`.
    """
    s = settings.SampleSettings(**flags)
    texts = prompts.read(s.prompt, s.prompt_file)
    run_dir = os.path.join(s.checkpoint_dir, str(s.run_name)) if s.run_name is not None else None
    if run_dir is not None and not os.path.isdir(run_dir):
        raise UserError(f'no run folder {run_dir} (from --run_name {s.run_name} under '
                        f'--checkpoint_dir {s.checkpoint_dir})')
    plan = palimpsest_lib.plan_from_flags(schedule=schedule, cycle=cycle, steps=steps,
                                          every=every, blend=blend, run_dir=run_dir,
                                          length=s.length)
    if plan.note and not s.quiet:
        print(f'note: {plan.note}', file=sys.stderr)
    prefixes = plan.prefixes
    hparams = palimpsest_lib.check_same_hparams(prefixes)
    store = palimpsest_lib.Store(hparams, budget_mb, s.dtype)
    if plan.blend:
        need = len(plan.blend) * store.copy_bytes()
        if need > store.budget:
            raise UserError(f'--blend needs all {len(plan.blend)} checkpoints in memory at once '
                            f'({need >> 20} MB in {s.dtype}), more than --budget_mb {budget_mb}; '
                            'raise it, or take a narrower --dtype')
    enc = _encoder(prefixes[0])
    stop_ids, stop_strings = prompts.stops(s.stop, enc)
    s = sampling.seeded(s)
    rows, shown = prompts.rows(texts, enc, hparams, s.nsamples)
    update, close = sampling.progress_bar(len(rows) * s.length, s.quiet)
    try:
        res = palimpsest_lib.sample(
            hparams, plan.turns, store, s, prompts=rows, cache=cache, blend=plan.blend,
            stop_ids=stop_ids, stop_strings=stop_strings, decode_text=enc.decode,
            jit_compile=s.xla, progress=update)
    finally:
        close()
    base = palimpsest_lib.output_name(f'palimpsest-{cache}', plan.description, seed=s.seed,
                                      temperature=s.temperature)
    path = s.output or os.path.join(s.samples_dir, base + '.txt')
    chunks, records = [], []
    for i, (toks, text, stretches) in enumerate(zip(res['tokens'], res['texts'],
                                                    res['stretches'])):
        if annotate:
            text, rec = palimpsest_lib.annotate(toks, stretches, enc.decode, text=text)
            # 'spans': the record's key for the stretches since its first version
            records.append({'sample': i + 1, 'prompt': shown[i], 'spans': rec})
        body = (shown[i] + text) if s.include_prompt else text
        chunks.append(body)
        _show(i, body, s.quiet)
    meta = {'plan': plan.description, 'cache': cache, 'dtype': s.dtype, 'seed': s.seed,
            'temperature': s.temperature,
            'top_k': s.top_k, 'top_p': s.top_p, 'repetition_penalty': s.repetition_penalty,
            'length': s.length, 'written': datetime.datetime.now().isoformat(timespec='seconds'),
            'checkpoints': prefixes}
    if annotate:
        meta['samples'] = records
    json_path = palimpsest_lib.write(path, chunks, meta)
    print(f'wrote {path} and {json_path} (seed {s.seed})', file=sys.stderr)


def atlas(*, steps='all', temperatures=atlas_lib.DEFAULT_TEMPERATURES,
          nsamples=atlas_lib.DEFAULT_NSAMPLES, corpus=None, ngram=novelty_lib.DEFAULT_NGRAM,
          every=None, batch_size=None, **flags):
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
    atlas_lib.run(settings.SampleSettings(nsamples=nsamples, **flags),
                  steps=steps, temperatures=temperatures, corpus=corpus, ngram=ngram, every=every,
                  batch_size=batch_size)


# The flags each entry takes from SampleSettings, with its defaults (written once there);
# fire reads these signatures for parsing and --help.
sample.__signature__ = settings.SampleSettings.signature(sample, omit=('samples_dir',))
score.__signature__ = settings.SampleSettings.signature(
    score, only=('model_name', 'run_name', 'checkpoint', 'models_dir', 'checkpoint_dir', 'dtype'))
palimpsest.__signature__ = settings.SampleSettings.signature(
    palimpsest, omit=('model_name', 'checkpoint', 'models_dir'))
atlas.__signature__ = settings.SampleSettings.signature(
    atlas, only=('prompt', 'prompt_file', 'run_name', 'checkpoint_dir', 'length', 'top_k', 'top_p',
                 'seed', 'output', 'samples_dir', 'quiet', 'xla', 'dtype'))


# Subcommands beside the default sampling.
COMMANDS = {'score': score, 'palimpsest': palimpsest, 'novelty': novelty_lib.run,
            'atlas': atlas}


def entry(argv=None):
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] in COMMANDS:
        cmd = argv.pop(1)
        return cli.main(COMMANDS[cmd], name=f'sample.py {cmd}')
    return cli.main(sample, name='sample.py')


if __name__ == '__main__':
    entry()
