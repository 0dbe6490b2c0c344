"""Prompts and stop strings as the command line gives them: escapes, prompt files, token rows."""
import codecs
import os
import re

from gpt2 import sampling
from gpt2.errors import UserError


def unescape(s):
    """Flags arrive as typed: '\\n' is two characters; turn escapes into what they name."""
    return codecs.decode(str(s), 'unicode_escape') if '\\' in str(s) else str(s)


def stops(stop, enc):
    """--stop (a string or a list) -> (token ids stopped inside the loop, strings checked between
    chunks)."""
    if stop is None:
        return (), ()
    items = list(stop) if isinstance(stop, (list, tuple)) else [stop]
    ids, strings = [], []
    for s in (unescape(x) for x in items):
        if not s:
            raise UserError('--stop has an empty string; give the text (or <|endoftext|>)')
        if s in enc.special_tokens:
            ids.append(enc.special_tokens[s])
        else:
            strings.append(s)
    return tuple(ids), tuple(strings)


def read(prompt, prompt_file):
    """--prompt (a string or a list) or --prompt_file -> prompt texts, or None for none."""
    if prompt is not None and prompt_file is not None:
        raise UserError('give --prompt or --prompt_file, not both')
    if prompt is not None:
        return [unescape(p) for p in (prompt if isinstance(prompt, (list, tuple)) else [prompt])]
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


def rows(texts, enc, hparams, nsamples):
    """Prompt texts (or None) -> (a token row per sample, the prompt text shown before each):
    prompts repeat to fill nsamples, no prompt starts from <|endoftext|>; checked against the
    context length."""
    if texts is None:
        prompts, shown = [[sampling.start_token(hparams)]] * nsamples, [''] * nsamples
    else:
        ids = [enc.encode(t, allowed_special='all') for t in texts]  # a prompt may mark a boundary
        for t, i in zip(texts, ids):
            if not i:
                raise UserError(f'prompt {t!r} encodes to no tokens')
        n = max(nsamples, len(ids)) if len(ids) > 1 else nsamples
        prompts = [ids[k % len(ids)] for k in range(n)]
        shown = [texts[k % len(texts)] for k in range(n)]
    sampling.check_prompts(hparams, prompts)
    return prompts, shown
