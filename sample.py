#!/usr/bin/env python3
"""Sample from GPT-2: unconditional, prompted, interactive; score a text; the palimpsest sampler."""
import codecs
import datetime
import os
import re
import sys

from gpt2 import cli

cli.quiet_tensorflow()

from gpt2 import checkpoint, novelty as novelty_lib, palimpsest as palimpsest_lib  # noqa: E402
from gpt2 import fast, model, paths, sampling, scoring  # noqa: E402
from gpt2.errors import UserError  # noqa: E402

MODELS_DIR, CHECKPOINT_DIR, SAMPLES_DIR = paths.MODELS_DIR, paths.CHECKPOINT_DIR, paths.SAMPLES_DIR
DELIMITER = novelty_lib.SAMPLE_HEADER


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
    folder = os.path.dirname(prefix) or '.'
    return encoder.get_encoder(folder)


def _load(model_name, run_name, checkpoint_path, models_dir, checkpoint_dir):
    path = _load_source(model_name, run_name, checkpoint_path, models_dir, checkpoint_dir)
    params, hparams, prefix = checkpoint.load_params(path)
    return params, hparams, prefix, _encoder(prefix)


def _unescape(s):
    # Flags arrive as typed: '\n' is two characters; turn escapes into what they name.
    return codecs.decode(str(s), 'unicode_escape') if '\\' in str(s) else str(s)


def _stops(stop, enc):
    """--stop -> (token ids stopped inside the loop, strings checked between chunks)."""
    if stop is None:
        return (), ()
    items = list(stop) if isinstance(stop, (list, tuple)) else [stop]
    ids, strings = [], []
    for s in (_unescape(x) for x in items):
        if not s:
            raise UserError('--stop has an empty string; give the text (or <|endoftext|>)')
        if s in enc.special_tokens:
            ids.append(enc.special_tokens[s])
        else:
            strings.append(s)
    return tuple(ids), tuple(strings)


def _read_prompts(prompt, prompt_file):
    if prompt is not None and prompt_file is not None:
        raise UserError('give --prompt or --prompt_file, not both')
    if prompt is not None:
        return [_unescape(p) for p in (prompt if isinstance(prompt, (list, tuple)) else [prompt])]
    if prompt_file is None:
        return None
    if not os.path.isfile(prompt_file):
        raise UserError(f'prompt file {prompt_file} does not exist')
    with open(prompt_file, encoding='utf-8') as f:
        text = f.read()
    # Blank-line separated blocks when there are any, else one prompt per line. A line of
    # spaces or tabs looks blank, so it counts as one.
    blank = re.compile(r'\n(?:[ \t]*\n)+')
    blocks = [b.strip('\n') for b in blank.split(text)] if blank.search(text.strip()) else \
        text.splitlines()
    prompts = [b for b in blocks if b.strip()]
    if not prompts:
        raise UserError(f'prompt file {prompt_file} has no prompt in it')
    return prompts


def _encode_prompts(texts, enc, hparams, nsamples):
    """Prompt texts -> one token list per sample (prompts repeat to fill nsamples)."""
    if texts is None:
        return None, None
    ids = [enc.encode(t, allowed_special='all') for t in texts]  # a prompt may mark a boundary
    for t, i in zip(texts, ids):
        if not i:
            raise UserError(f'prompt {t!r} encodes to no tokens')
    n = max(nsamples, len(ids)) if len(ids) > 1 else nsamples
    return [ids[k % len(ids)] for k in range(n)], [texts[k % len(texts)] for k in range(n)]


def _prompt_rows(texts, enc, hparams, nsamples):
    """Token rows to sample from (the start token when there is no prompt), and the prompt text
    shown before each sample; checked against the context length."""
    prompts, shown = _encode_prompts(texts, enc, hparams, nsamples)
    if prompts is None:
        prompts, shown = [[sampling.start_token(hparams)]] * nsamples, [''] * nsamples
    sampling.check_prompts(hparams, prompts)
    return prompts, shown


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


SHARED_FLAGS = """
    Weights (one of): --model_name NAME (models/NAME under --models_dir, default 124M);
      --run_name RUN (the latest checkpoint in checkpoint/RUN under --checkpoint_dir);
      --checkpoint PATH (a checkpoint prefix, run folder or model folder).
    Prompts: --prompt TEXT (escapes like \\n understood); --prompt_file FILE (one prompt per
      blank-line separated block, or per line when there are no blank lines; different prompts
      share a batch); none = unconditional, starting from <|endoftext|>.
    Controls:
      --nsamples N (1), --batch_size N (1): samples, and how many decode together.
      --length N (100): new tokens per sample; past n_ctx the context window slides (the model
        then reads the last 3/4 of n_ctx tokens).
      --temperature T (1.0; 0 = greedy, the most likely token every time).
      --top_k K (0 = off): keep the K most likely tokens.
      --top_p P (1.0 = off, else in (0, 1]): keep the most likely tokens whose probabilities
        first sum to P. Order: repetition penalty, temperature, top_k, then top_p on what top_k
        kept (renormalised); both may be on.
      --repetition_penalty R (1.0 = off; CTRL used 1.2): every token already in the text has its
        logit divided by R when positive, multiplied by R when negative.
      --seed S: makes the run reproducible (a sample is the same whatever --batch_size); printed
        when not given.
      --stop S or --stop '["a", "b"]': a row stops when it writes one (during generation; the stop
        text is not kept). '<|endoftext|>' stops on that token.
      --include_prompt: print the prompt before each continuation.
      --output FILE: also write the samples to FILE, separated by a delimiter line.
      --quiet: no progress bar and no delimiter lines on stdout.
      --xla (true): compile the decode loop with XLA (faster on CPU; see BENCHMARKS.md)."""


def sample(prompt=None, prompt_file=None, interactive=False, model_name=None, run_name=None,
           checkpoint=None, models_dir=MODELS_DIR, checkpoint_dir=CHECKPOINT_DIR,
           nsamples=1, batch_size=1, length=sampling.DEFAULT_LENGTH,
           temperature=sampling.DEFAULT_TEMPERATURE, top_k=sampling.DEFAULT_TOP_K,
           top_p=sampling.DEFAULT_TOP_P, repetition_penalty=sampling.DEFAULT_PENALTY, seed=None,
           stop=None, include_prompt=False, output=None, quiet=False, xla=True,
           novel_against=None, novel_mode='mark', ngram=novelty_lib.DEFAULT_NGRAM):
    """Generate text. Subcommands: `sample.py score|palimpsest|novelty --help`.

    Weights (one of): --model_name NAME (MODELS_DIR/NAME), --run_name RUN (the latest checkpoint
    of CHECKPOINT_DIR/RUN), --checkpoint PATH (a run folder, model folder or checkpoint prefix).

    Args:
        prompt: a prompt (escapes like \\n are read); without one, samples start from
            <|endoftext|> (unconditional).
        prompt_file: a file of prompts, one per line, or one per block when blank lines separate
            blocks; different prompts share a batch, each gets --nsamples samples.
        interactive: read a prompt from stdin, print samples, repeat (Ctrl-D ends).
        nsamples: samples per prompt.  batch_size: samples generated at once.
        length: new tokens per sample; past n_ctx the model slides its window (keeps 3/4).
        temperature: divides the logits; 0 is greedy (argmax).
        top_k: keep the k most likely tokens (0: all).  top_p: then keep the smallest set whose
            probability reaches p (1: all); both may be active, top-k first.
        repetition_penalty: CTRL's rule on tokens already in the text (logit / r if positive,
            logit * r if negative; 1: off).
        seed: makes the samples reproducible (printed when not given).
        stop: a string, or a list of strings/tokens; each sample ends where it first writes one.
        include_prompt: print the prompt before each sample.
        output: also write the samples to this file (samples separated by delimiter lines).
        quiet: no progress bar or delimiters on stdout.
        xla: compile the decode loop with XLA (--noxla: TF's kernels).
        novel_against: training text (files, folders, globs, comma-separated): lines copied from
            it are marked or dropped (see `sample.py novelty --help`); the copy rate goes to stderr.
        novel_mode: mark (prefix copied lines with '[copied] ') or drop.
        ngram: tokens in a shared run that make a line copied.
    """
    _controls(length, temperature, top_k, top_p, repetition_penalty, nsamples, batch_size)
    texts = _read_prompts(prompt, prompt_file)  # bad input fails before the weights load
    novel = (novelty_lib.Filter(novel_against, mode=novel_mode, ngram=ngram)
             if novel_against else None)
    params, hparams, prefix, enc = _load(model_name, run_name, checkpoint, models_dir,
                                         checkpoint_dir)
    params = fast.for_decoding(params)
    stop_ids, stop_strings = _stops(stop, enc)
    seed = sampling.new_seed() if seed is None else int(seed)
    print(f'checkpoint {prefix}, seed {seed}', file=sys.stderr)
    spans = [(0, (params,), (1.0,))]

    def once(prompt_texts, seed, out_file):
        prompts, shown = _prompt_rows(prompt_texts, enc, hparams, nsamples)
        update, close = _progress(len(prompts) * length, quiet)
        try:
            res = sampling.run_spans(
                hparams, spans, prompts=prompts, batch_size=batch_size, length=length,
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
            if not quiet:
                print(DELIMITER.format(i + 1))
            print(body)
        if out_file:
            palimpsest_lib.write_atomic(out_file, ''.join(
                DELIMITER.format(i + 1) + '\n' + c + '\n' for i, c in enumerate(chunks)))
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
        once([_unescape(line)], seed + n, None)
        n += 1


def score(file=None, text=None, model_name=None, run_name=None, checkpoint=None,
          models_dir=MODELS_DIR, checkpoint_dir=CHECKPOINT_DIR, tokens=False):
    """Score a text: mean loss (nats per token), perplexity and bits per byte under a checkpoint.

    --file F or --text T (one of them); --tokens also prints each token's log-probability.
    The first token is conditioned on <|endoftext|>; long texts are read in windows overlapping by
    half of n_ctx. Weights: --model_name, --run_name or --checkpoint as for sampling.
    """
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
    lp = scoring.score(hparams, model.to_tensors(params), ids,
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
               budget_mb=palimpsest_lib.DEFAULT_BUDGET_MB, quiet=False, xla=True):
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
    temperature (or --output FILE); --budget_mb caps the weights held in memory at once.
    Prompts and controls as for plain sampling (except --model_name).
    """
    _controls(length, temperature, top_k, top_p, repetition_penalty, nsamples, batch_size)
    texts = _read_prompts(prompt, prompt_file)
    plans = [x is not None for x in (schedule, cycle, steps, blend)]
    if sum(plans) != 1:
        raise UserError('give exactly one of --schedule, --cycle, --steps or --blend')
    run_dir = os.path.join(checkpoint_dir, str(run_name)) if run_name is not None else None
    if run_dir is not None and not os.path.isdir(run_dir):
        raise UserError(f'no run folder {run_dir} (from --run_name {run_name} under '
                        f'--checkpoint_dir {checkpoint_dir})')
    name = lambda n: palimpsest_lib.resolve_name(n, run_dir)  # noqa: E731
    blend_plan, plan = None, None
    if schedule is not None:
        plan = [(pos, name(n)) for pos, n in palimpsest_lib.parse_schedule(schedule)]
        described = str(schedule)
    elif cycle is not None:
        if every is None:
            raise UserError('--cycle needs --every N (tokens per checkpoint)')
        names = [name(n) for n in palimpsest_lib.split_items(cycle, '--cycle')]
        plan = palimpsest_lib.cycle_plan(names, every, length)
        described = f'cycle-{cycle}-every{every}'
    elif steps is not None:
        if every is None:
            raise UserError('--steps needs --every N (tokens per checkpoint)')
        if str(steps) == 'all':
            if run_dir is None:
                raise UserError('--steps all needs --run_name (the run to walk through)')
            names = palimpsest_lib.all_steps(run_dir)
        else:
            names = [name(n) for n in palimpsest_lib.split_items(steps, '--steps')]
        plan = palimpsest_lib.walk_plan(names, every)
        described = f'steps-{steps}-every{every}'
        if len(names) * every > length + every and not quiet:
            print(f'note: {len(names)} checkpoints x {every} tokens is more than --length '
                  f'{length}; the later ones are not reached', file=sys.stderr)
    else:
        blend_plan = [(name(n), w) for n, w in palimpsest_lib.parse_blend(blend)]
        described = f'blend-{blend}'
    prefixes = [p for _, p in plan] if plan else [p for p, _ in blend_plan]
    hparams = palimpsest_lib.check_same_hparams(prefixes)
    store = palimpsest_lib.Store(hparams, budget_mb)
    if blend_plan:
        need = sum(os.path.getsize(p + checkpoint.DATA_SUFFIX) for p, _ in blend_plan)
        if need > store.budget:
            raise UserError(f'--blend needs all {len(blend_plan)} checkpoints in memory at once '
                            f'({need >> 20} MB), more than --budget_mb {budget_mb}; raise it')
    enc = _encoder(prefixes[0])
    stop_ids, stop_strings = _stops(stop, enc)
    seed = sampling.new_seed() if seed is None else int(seed)
    prompts, shown = _prompt_rows(texts, enc, hparams, nsamples)
    update, close = _progress(len(prompts) * length, quiet)
    try:
        res = palimpsest_lib.run(
            hparams, plan, store, prompts=prompts, batch_size=batch_size, length=length,
            cache=cache, blend=blend_plan, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, repetition_penalty=repetition_penalty, stop_ids=stop_ids,
            stop_strings=stop_strings, decode_text=enc.decode, jit_compile=xla, progress=update)
    finally:
        close()
    base = palimpsest_lib.output_name(f'palimpsest-{cache}', described, seed=seed,
                                      temperature=temperature)
    path = output or os.path.join(samples_dir, base + '.txt')
    chunks, records = [], []
    for i, (toks, text, spans) in enumerate(zip(res['tokens'], res['texts'], res['spans'])):
        if annotate:
            text, rec = palimpsest_lib.annotate(toks, spans, enc.decode, text=text)
            records.append({'sample': i + 1, 'prompt': shown[i], 'spans': rec})
        body = (shown[i] + text) if include_prompt else text
        chunks.append(body)
        if not quiet:
            print(DELIMITER.format(i + 1))
        print(body)
    palimpsest_lib.write_atomic(path, ''.join(
        DELIMITER.format(i + 1) + '\n' + c + '\n' for i, c in enumerate(chunks)))
    meta = {'plan': described, 'cache': cache, 'seed': seed, 'temperature': temperature,
            'top_k': top_k, 'top_p': top_p, 'repetition_penalty': repetition_penalty,
            'length': length, 'written': datetime.datetime.now().isoformat(timespec='seconds'),
            'checkpoints': prefixes}
    if annotate:
        meta['samples'] = records
    json_path = os.path.splitext(path)[0] + '.json'
    palimpsest_lib.write_json(json_path, meta)
    print(f'wrote {path} and {json_path} (seed {seed})', file=sys.stderr)


sample.__doc__ += SHARED_FLAGS
palimpsest.__doc__ += SHARED_FLAGS.split('      --xla')[0].replace(
    'Weights (one of)', 'Weights (plain sampling only)')

# Subcommands beside the default sampling; `novelty` joins here.
def novelty(corpus, samples, mode='drop', ngram=novelty_lib.DEFAULT_NGRAM, output=None):
    novelty_lib.run(corpus, samples, mode=mode, ngram=ngram, output=output)


novelty.__doc__ = novelty_lib.run.__doc__.split('    Returns:')[0]
COMMANDS = {'score': score, 'palimpsest': palimpsest, 'novelty': novelty}


def entry(argv=None):
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] in COMMANDS:
        cmd = argv.pop(1)
        return cli.main(COMMANDS[cmd], name=f'sample.py {cmd}')
    return cli.main(sample, name='sample.py')


if __name__ == '__main__':
    entry()
