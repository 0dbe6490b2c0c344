"""Plain sampling (sample.py without a subcommand): the checkpoint sample.py's flags name, loaded
once, and its samples for prompts, printed and written as a samples file; the interactive loop."""
import dataclasses
import sys

from gpt2 import fast
from gpt2 import novelty
from gpt2 import paths
from gpt2 import prompts
from gpt2 import samples_file
from gpt2 import sampling
from gpt2 import source


class Session:
    """The weights, encoder and stops that settings.SampleSettings `s` name, loaded once (with
    the seed they give, or a fresh one); `samples` draws for any prompts, with any seed."""

    def __init__(self, s, *, novel=None):
        params, self.hparams, self.prefix, self.enc = source.load(s)
        self.spans = [sampling.Span.fixed(fast.for_decoding(params, s.dtype))]
        self.stop_ids, self.stop_strings = prompts.stops(s.stop, self.enc)
        self.settings = sampling.seeded(s)
        self.novel = novel

    def samples(self, texts, seed):
        """Each sample's text for the prompt texts (None: unconditional) drawn with `seed`: after
        its prompt with --include_prompt, copied lines marked or dropped by the novelty filter."""
        s = dataclasses.replace(self.settings, seed=seed)
        rows, shown = prompts.rows(texts, self.enc, self.hparams, s.nsamples)
        update, close = sampling.progress_bar(len(rows) * s.length, s.quiet)
        try:
            res = sampling.run_spans(self.hparams, self.spans, s, prompts=rows,
                                     stop_ids=self.stop_ids, stop_strings=self.stop_strings,
                                     decode_text=self.enc.decode, jit_compile=s.xla,
                                     progress=update)
        finally:
            close()
        bodies = [(shown[i] + text) if s.include_prompt else text
                  for i, text in enumerate(res['texts'])]
        return [self.novel.check(b)[0] for b in bodies] if self.novel else bodies


def run(s, *, interactive, novel_against, novel_mode, ngram):
    """sample.py (its --help says what each flag means): samples for --prompt or --prompt_file
    (or unconditional) printed and written to --output; or, `interactive`, for each prompt typed
    on stdin until it ends, answer n drawn with seed + n. Lines copied from `novel_against` are
    marked or dropped (`novel_mode`, `ngram`: novelty.Filter's)."""
    texts = prompts.read(s.prompt, s.prompt_file)  # bad input fails before the weights load
    novel = novelty.Filter(novel_against, mode=novel_mode, ngram=ngram) if novel_against else None
    session = Session(s, novel=novel)
    seed = session.settings.seed
    print(f'checkpoint {session.prefix}, seed {seed}', file=sys.stderr)
    if interactive:
        for n, line in enumerate(_typed()):
            samples_file.print_samples(session.samples([prompts.unescape(line)], seed + n),
                                       quiet=s.quiet)
        return
    bodies = session.samples(texts, seed)
    samples_file.print_samples(bodies, quiet=s.quiet)
    if s.output:
        paths.write_text(s.output, samples_file.format_samples(bodies))
    if novel:
        print(f'novelty: {novel.total}', file=sys.stderr)


def _typed():
    """The prompts typed at 'Model prompt >>> ' until the input ends; a blank one is refused."""
    while True:
        try:
            line = input('Model prompt >>> ')
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip():
            yield line
        else:
            print('Prompt should not be empty!', file=sys.stderr)
