#!/usr/bin/env python3
"""Sample from GPT-2: unconditional, prompted, interactive; score a text; the palimpsest sampler;
the novelty filter; the atlas of a run. Each is a fire entry over the library."""
import inspect
import sys

from gpt2 import cli, quiet

quiet.import_tensorflow()

from gpt2 import atlas as atlas_lib, novelty as novelty_lib  # noqa: E402
from gpt2 import palimpsest as palimpsest_lib, scoring, session, settings  # noqa: E402


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
    session.run(settings.SampleSettings(**flags), interactive=interactive,
                novel_against=novel_against, novel_mode=novel_mode, ngram=ngram)


def score(*, file=None, text=None, tokens=False, **flags):
    """Score a text: mean loss (nats per token), perplexity and bits per byte under a checkpoint.

    --file F or --text T (one of them); --tokens also prints each token's log-probability.
    The first token is conditioned on <|endoftext|>; long texts are read in windows overlapping by
    half of n_ctx. Weights: --model_name, --run_name or --checkpoint and --dtype as for sampling.
    """
    scoring.run(settings.SampleSettings(**flags), file=file, text=text, tokens=tokens)


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
    palimpsest_lib.run(settings.SampleSettings(**flags), schedule=schedule, cycle=cycle,
                       steps=steps, every=every, blend=blend, cache=cache, annotated=annotate,
                       budget_mb=budget_mb)


def novelty(corpus, samples, **flags):
    """Drop or mark the lines of a samples file that are copied from the training corpus.

    A line is copied when, after collapsing whitespace and ignoring case, it is a line of the
    corpus, or when it shares a run of --ngram GPT-2 tokens with the corpus. Prints on stderr the
    share of lines copied and the share of generated n-grams found in the corpus (a memorisation
    rate: compare it across checkpoints to pick one that writes rather than recites).

    Args:
        corpus: training text: files, folders or globs (comma-separated on the command line);
            .txt or .npz token files from encode.py.
        samples: a file written by sample.py (samples separated by lines of '=' * 40, kept as is).
        mode: drop (remove copied lines) or mark (prefix them with '[copied] ').
        ngram: length in tokens of a shared run that makes a line copied (about 0.75 words a token).
        output: where to write the filtered samples (written atomically); default stdout.
        delimiter: lines starting with this separate samples; never checked, always kept.

    It returns the report as a dict: ngram, lines, copied_lines, line_share, ngrams,
    copied_ngrams, ngram_share (shares are None when nothing was counted).
    """
    return novelty_lib.run(corpus, samples, **flags)


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
    atlas_lib.run(settings.SampleSettings(nsamples=nsamples, **flags), steps=steps,
                  temperatures=temperatures, corpus=corpus, ngram=ngram, every=every,
                  batch_size=batch_size)


# What fire parses and --help lists: each entry's own flags and those it takes from
# SampleSettings (novelty's are novelty.run's), each default written once there; the first
# flags by position too, in the order they always had.
sample = settings.SampleSettings.entry(sample, omit=('samples_dir',),
                                       lead=('prompt', 'prompt_file'))
score = settings.SampleSettings.entry(
    score, only=('model_name', 'run_name', 'checkpoint', 'models_dir', 'checkpoint_dir', 'dtype'))
palimpsest = settings.SampleSettings.entry(palimpsest, omit=('model_name', 'checkpoint',
                                                             'models_dir'))
novelty.__signature__ = inspect.signature(novelty_lib.run)
atlas = settings.SampleSettings.entry(
    atlas, only=('prompt', 'prompt_file', 'run_name', 'checkpoint_dir', 'length', 'top_k', 'top_p',
                 'seed', 'output', 'samples_dir', 'quiet', 'xla', 'dtype'), lead=('run_name',))

# Subcommands beside the default sampling.
COMMANDS = {'score': score, 'palimpsest': palimpsest, 'novelty': novelty, 'atlas': atlas}


def entry(argv=None):
    argv = sys.argv if argv is None else argv
    if len(argv) > 1 and argv[1] in COMMANDS:
        cmd = argv.pop(1)
        return cli.main(COMMANDS[cmd], name=f'sample.py {cmd}')
    return cli.main(sample, name='sample.py')


if __name__ == '__main__':
    entry()
