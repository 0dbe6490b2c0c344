"""Model hyperparameters: OpenAI's hparams.json keys, validated, plus named presets."""
import dataclasses
import json
import os

from gpt2 import errors
from gpt2 import paths
from gpt2.errors import UserError

FILENAME = 'hparams.json'


@dataclasses.dataclass(frozen=True)
class HParams:
    """Static shapes of a GPT-2 (plain ints: they become tensor shapes)."""
    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return dataclasses.asdict(self)


KEYS = tuple(f.name for f in dataclasses.fields(HParams))

# OpenAI's released sizes, and small shapes for training from scratch on a CPU.
PRESETS = {
    '124M': HParams(),
    '355M': HParams(n_embd=1024, n_head=16, n_layer=24),
    '774M': HParams(n_embd=1280, n_head=20, n_layer=36),
    '1558M': HParams(n_embd=1600, n_head=25, n_layer=48),
    'tiny': HParams(n_ctx=128, n_embd=64, n_head=4, n_layer=2),
    'small': HParams(n_ctx=256, n_embd=256, n_head=4, n_layer=4),
}


def from_dict(d, *, source='hparams'):
    """Validate a mapping with exactly OpenAI's five keys; raise UserError naming every problem."""
    if not isinstance(d, dict):
        raise UserError(f'{source}: expected a JSON object with keys {", ".join(KEYS)}, '
                        f'got {type(d).__name__}')
    problems = []
    missing = [k for k in KEYS if k not in d]
    unknown = sorted(set(d) - set(KEYS))
    if missing:
        problems.append(f'missing {", ".join(missing)}')
    if unknown:
        problems.append(f'unknown {", ".join(unknown)} (expected {", ".join(KEYS)})')
    for k in KEYS:
        v = d.get(k)
        if k in d and not errors.is_whole(v, 1):
            problems.append(f'{k} must be a positive integer, got {v!r}')
    if not problems and d['n_embd'] % d['n_head']:
        problems.append(f'n_embd ({d["n_embd"]}) must be divisible by n_head ({d["n_head"]})')
    if problems:
        raise UserError(f'{source}: ' + '; '.join(problems))
    return HParams(**{k: d[k] for k in KEYS})


def load(path):
    """Read hparams.json, or the hparams.json inside a folder."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.isfile(path):
        raise UserError(f'no hparams file at {path} (expected OpenAI\'s hparams.json)')
    try:
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f'{path} is not valid JSON: {e}') from None
    return from_dict(d, source=path)


def get(name_or_path):
    """A preset name ('124M', 'tiny', ...), an HParams, or a path to hparams.json or its folder."""
    if isinstance(name_or_path, HParams):
        return name_or_path
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if os.path.exists(name_or_path):
        return load(name_or_path)
    raise UserError(f'unknown hparams {name_or_path!r}: give a preset '
                    f'({", ".join(PRESETS)}) or a path to an hparams.json')


def save(hparams, path):
    """Write hparams.json atomically (into `path`, or `path/hparams.json` for a folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    paths.write_text(path, json.dumps(hparams.to_dict(), indent=2) + '\n')
