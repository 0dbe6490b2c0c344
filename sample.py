#!/usr/bin/env python3
"""Sample from GPT-2: unconditional, prompted, interactive; score a text; the palimpsest sampler;
the atlas of a run."""
import datetime
import os
import sys

from gpt2 import cli

cli.quiet_tensorflow()

from gpt2 import atlas as atlas_lib  # noqa: E402
from gpt2 import checkpoint, novelty as novelty_lib, palimpsest as palimpsest_lib  # noqa: E402
from gpt2 import fast, paths, precision, prompts, samples_file, sampling, scoring  # noqa: E402
from gpt2.errors import UserError  # noqa: E402

MODELS_DIR, CHECKPOINT_DIR, SAMPLES_DIR = paths.MODELS_DIR, paths.CHECKPOINT_DIR, paths.SAMPLES_DIR


# ---- shared pieces of the subcommands ----

def _load_source(model_name, run_name, checkpoint_path, models_dir, checkpoint_dir):
    """The path that --model_name, --run_name or --checkpoint names (124M by default)."""
    given = [x for x in (model_name, run_name, checkpoint_path) if x is not None]
    if len(given) > 1:
        raise UserError('give one of --model_name, --run_name or --checkpoint, not several')
    if checkpoint_path is not None:
        return str(checkpoint_path)
    if run_name is not None:
        return os.path.join(checkpoint_dir, str(run_name))
    return paths.model_dir('124M' if model_name is None else model_name, models_dir)


def _encoder(prefix):
    import encoder
    return encoder.get_encoder(os.path.dirname(prefix) or '.')


def _load(model_name, run_name, checkpoint_path, models_dir, checkpoint_dir):
    path = _load_source(model_name, run_name, checkpoint_path, models_dir, checkpoint_dir)
    params, hparams, prefix = checkpoint.load_params(path)
    return params, hparams, prefix, _encoder(prefix)


def _progress(total, quiet):
    if quiet or total < 200:
        return None, lambda: None
    import tqdm
    bar = tqdm.tqdm(total=total, unit='tok', file=sys.stderr, leave=False)
    return bar.update, bar.close


def _controls(length, temperature, top_k, top_p, repetition_penalty, nsamples, batch_size):
    sampling.check_controls(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, nsamples=nsamples,
                            batch_size=batch_size)


def _show(i, body, quiet):
    if not quiet:
        print(samples_file.SAMPLE_HEADER.format(i + 1))
    print(body)


def sample(prompt=None, prompt_file=None, interactive=False, model_name=None, run_name=None,
           checkpoint=None, models_dir=MODELS_DIR, checkpoint_dir=CHECKPOINT_DIR,
           nsamples=1, batch_size=1, length=sampling.DEFAULT_LENGTH,
           temperature=sampling.DEFAULT_TEMPERATURE, top_k=sampling.DEFAULT_TOP_K,
           top_p=sampling.DEFAULT_TOP_P, repetition_penalty=sampling.DEFAULT_PENALTY, seed=None,
           stop=None, include_prompt=False, output=None, quiet=False, xla=True, dtype='fp32',
           novel_against=None, novel_mode='mark', ngram=novelty_lib.DEFAULT_NGRAM):
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
    _controls(length, temperature, top_k, top_p, repetition_penalty, nsamples, batch_size)
    precision.check_dtype(dtype)
    texts = prompts.read(prompt, prompt_file)  # bad input fails before the weights load
    novel = (novelty_lib.Filter(novel_against, mode=novel_mode, ngram=ngram)
             if novel_against else None)
    params, hparams, prefix, enc = _load(model_name, run_name, checkpoint, models_dir,
                                         checkpoint_dir)
    params = fast.for_decoding(params, dtype)
    stop_ids, stop_strings = prompts.stops(stop, enc)
    seed = sampling.new_seed() if seed is None else int(seed)
    print(f'checkpoint {prefix}, seed {seed}', file=sys.stderr)
    spans = [sampling.Span.fixed(params)]

    def once(prompt_texts, seed, out_file):
        rows, shown = prompts.rows(prompt_texts, enc, hparams, nsamples)
        update, close = _progress(len(rows) * length, quiet)
        try:
            res = sampling.run_spans(
                hparams, spans, prompts=rows, batch_size=batch_size, length=length,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                repetition_penalty=repetition_penalty, stop_ids=stop_ids,
                stop_strings=stop_strings, decode_text=enc.decode, jit_compile=xla,
                progress=update)
        finally:
            close()
        chunks = []
        for i, text in enumerate(res['texts']):
            body = (shown[i] + text) if include_prompt else text
            if novel:
                body, _ = novel.check(body)
            chunks.append(body)
            _show(i, body, quiet)
        if out_file:
            paths.write_text(out_file, samples_file.format_samples(chunks))
        return chunks

    if not interactive:
        once(texts, seed, output)
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
        once([prompts.unescape(line)], seed + n, None)
        n += 1


def score(file=None, text=None, model_name=None, run_name=None, checkpoint=None,
          models_dir=MODELS_DIR, checkpoint_dir=CHECKPOINT_DIR, tokens=False, dtype='fp32'):
    """Score a text: mean loss (nats per token), perplexity and bits per byte under a checkpoint.

    --file F or --text T (one of them); --tokens also prints each token's log-probability.
    The first token is conditioned on <|endoftext|>; long texts are read in windows overlapping by
    half of n_ctx. Weights: --model_name, --run_name or --checkpoint and --dtype as for sampling.
    """
    precision.check_dtype(dtype)
    if (file is None) == (text is None):
        raise UserError('give one of --file or --text to score')
    if file is not None:
        if not os.path.isfile(file):
            raise UserError(f'file to score {file} does not exist')
        with open(file, encoding='utf-8', errors='replace') as f:
            text = f.read()
    text = str(text)
    params, hparams, prefix, enc = _load(model_name, run_name, checkpoint, models_dir,
                                         checkpoint_dir)
    ids = enc.encode(text)
    if not ids:
        raise UserError('the text to score is empty')
    lp = scoring.score(hparams, fast.for_decoding(params, dtype), ids,
                       context_token=sampling.start_token(hparams))
    if tokens:
        for t, v in zip(ids, lp):
            print(f'{v:10.4f}\t{enc.decode([t])!r}')
    s = scoring.summary(lp, len(text.encode('utf-8')))
    print(f'checkpoint {prefix}: {s["tokens"]} tokens, loss {s["loss"]:.4f} nats/token, '
          f'perplexity {s["perplexity"]:.3f}, {s["bits_per_byte"]:.4f} bits/byte')


def palimpsest(schedule=None, cycle=None, steps=None, every=None, blend=None, cache='keep',
               annotate=False, prompt=None, prompt_file=None, run_name=None,
               checkpoint_dir=CHECKPOINT_DIR, nsamples=1, batch_size=1,
               length=sampling.DEFAULT_LENGTH, temperature=sampling.DEFAULT_TEMPERATURE,
               top_k=sampling.DEFAULT_TOP_K, top_p=sampling.DEFAULT_TOP_P,
               repetition_penalty=sampling.DEFAULT_PENALTY, seed=None, stop=None,
               include_prompt=False, output=None, samples_dir=SAMPLES_DIR,
               budget_mb=palimpsest_lib.DEFAULT_BUDGET_MB, quiet=False, xla=True, dtype='fp32'):
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
    _controls(length, temperature, top_k, top_p, repetition_penalty, nsamples, batch_size)
    precision.check_dtype(dtype)
    texts = prompts.read(prompt, prompt_file)
    run_dir = os.path.join(checkpoint_dir, str(run_name)) if run_name is not None else None
    if run_dir is not None and not os.path.isdir(run_dir):
        raise UserError(f'no run folder {run_dir} (from --run_name {run_name} under '
                        f'--checkpoint_dir {checkpoint_dir})')
    plan = palimpsest_lib.plan_from_flags(schedule=schedule, cycle=cycle, steps=steps,
                                          every=every, blend=blend, run_dir=run_dir,
                                          length=length)
    if plan.note and not quiet:
        print(f'note: {plan.note}', file=sys.stderr)
    prefixes = plan.prefixes
    hparams = palimpsest_lib.check_same_hparams(prefixes)
    store = palimpsest_lib.Store(hparams, budget_mb, dtype)
    if plan.blend:
        need = len(plan.blend) * store.copy_bytes()
        if need > store.budget:
            raise UserError(f'--blend needs all {len(plan.blend)} checkpoints in memory at once '
                            f'({need >> 20} MB in {dtype}), more than --budget_mb {budget_mb}; '
                            'raise it, or take a narrower --dtype')
    enc = _encoder(prefixes[0])
    stop_ids, stop_strings = prompts.stops(stop, enc)
    seed = sampling.new_seed() if seed is None else int(seed)
    rows, shown = prompts.rows(texts, enc, hparams, nsamples)
    update, close = _progress(len(rows) * length, quiet)
    try:
        res = palimpsest_lib.run(
            hparams, plan.turns, store, prompts=rows, batch_size=batch_size, length=length,
            cache=cache, blend=plan.blend, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, repetition_penalty=repetition_penalty, stop_ids=stop_ids,
            stop_strings=stop_strings, decode_text=enc.decode, jit_compile=xla, progress=update)
    finally:
        close()
    base = palimpsest_lib.output_name(f'palimpsest-{cache}', plan.description, seed=seed,
                                      temperature=temperature)
    path = output or os.path.join(samples_dir, base + '.txt')
    chunks, records = [], []
    for i, (toks, text, stretches) in enumerate(zip(res['tokens'], res['texts'],
                                                    res['stretches'])):
        if annotate:
            text, rec = palimpsest_lib.annotate(toks, stretches, enc.decode, text=text)
            # 'spans': the record's key for the stretches since its first version
            records.append({'sample': i + 1, 'prompt': shown[i], 'spans': rec})
        body = (shown[i] + text) if include_prompt else text
        chunks.append(body)
        _show(i, body, quiet)
    meta = {'plan': plan.description, 'cache': cache, 'dtype': dtype, 'seed': seed,
            'temperature': temperature,
            'top_k': top_k, 'top_p': top_p, 'repetition_penalty': repetition_penalty,
            'length': length, 'written': datetime.datetime.now().isoformat(timespec='seconds'),
            'checkpoints': prefixes}
    if annotate:
        meta['samples'] = records
    json_path = palimpsest_lib.write(path, chunks, meta)
    print(f'wrote {path} and {json_path} (seed {seed})', file=sys.stderr)


# Subcommands beside the default sampling.
COMMANDS = {'score': score, 'palimpsest': palimpsest, 'novelty': novelty_lib.run,
            'atlas': atlas_lib.run}


def entry(argv=None):
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] in COMMANDS:
        cmd = argv.pop(1)
        return cli.main(COMMANDS[cmd], name=f'sample.py {cmd}')
    return cli.main(sample, name='sample.py')


if __name__ == '__main__':
    entry()
