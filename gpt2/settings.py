"""Every setting of a training run (TrainSettings), and the flags sample.py's subcommands share
(SampleSettings), each in one frozen dataclass checked once when it is made: what the scripts'
flags fill in (and their fire signatures are built from) and what the library passes around."""
import dataclasses
import functools
import inspect
import math
import numbers

from gpt2 import dataset
from gpt2 import errors
from gpt2 import optim
from gpt2 import paths
from gpt2 import precision
from gpt2.errors import UserError

# train.py --strategy: gpt2/distribute.py makes each
STRATEGIES = ('none', 'mirrored', 'multi_worker', 'tpu')

# --keep_optimizer_state: the optimizer slots (for Adam twice the weights) stay in the newest
# checkpoint's sidecar only, or in every checkpoint's.
LATEST, ALL = 'latest', 'all'


def compiles_train_step(products):
    """Whether the train step runs under XLA unless told, for products in `products` (the
    precision): in fp32 yes (it fuses the elementwise work); in bf16 and fp16 only with a GPU,
    since XLA's CPU backend widens low-precision products to float32 ones while TF's oneDNN
    kernels run bf16 products natively (BENCHMARKS.md has both). The optimizer's update is
    compiled either way."""
    import tensorflow as tf   # (settings are made, and checked, before TensorFlow is needed)
    return products == 'fp32' or bool(tf.config.list_physical_devices('GPU'))


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The flags of train.py (its docstring says what each means), with their defaults."""
    dataset: object = None
    model_name: str = '124M'
    models_dir: str = paths.MODELS_DIR
    from_scratch: bool = False
    hparams: object = None
    run_name: str = 'run1'
    checkpoint_dir: str = paths.CHECKPOINT_DIR
    sample_dir: str = paths.SAMPLES_DIR
    restore_from: str = 'latest'
    steps: int = None
    batch_size: int = 1
    seq_len: int = None
    learning_rate: float = 1e-4
    lr_schedule: str = 'constant'
    warmup_steps: int = 0
    optimizer: str = 'adam'
    weight_decay: float = None        # None: optim.default_weight_decay(optimizer)
    max_grad_norm: float = None
    accumulate_gradients: int = 1
    memory_saving_gradients: bool = False
    layerwise: bool = False           # layerwise.make_layerwise_step: no whole-model gradients
    only_train_transformer_layers: bool = False
    noise: float = 0.0
    sample_every: int = 100
    sample_length: int = 200
    sample_num: int = 1
    save_every: int = 1000
    max_checkpoints: int = None
    keep_optimizer_state: str = LATEST
    val_dataset: object = None
    val_every: int = 0
    val_batch_size: int = 2
    val_batch_count: int = 40
    seed: int = 0
    curriculum: object = None
    combine: int = 50000              # characters per joined text chunk (nshepperd's default)
    precision: str = 'fp32'           # the products' type: gpt2/precision.py
    # None: compiles_train_step(precision) decides
    jit_compile: bool = None
    strategy: str = 'none'            # tf.distribute: gpt2/distribute.py
    tpu: str = None                   # --strategy tpu: the TPU's name or grpc:// address
    progress: bool = True

    @classmethod
    def from_flags(cls, **flags):
        """Settings from flags by name; an unknown name is a UserError, not a TypeError."""
        unknown = sorted(set(flags) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f'unknown flag {", ".join("--" + n for n in unknown)}; see '
                            'train.py --help')
        return cls(**flags)

    @classmethod
    def signature(cls, entry):
        """train.py's entry `entry` (dataset positional) with every field as a flag."""
        return entry_signature(entry, cls)

    def __post_init__(self):
        counts = {'batch_size': 1, 'accumulate_gradients': 1, 'save_every': 0,
                  'sample_every': 0, 'val_every': 0, 'warmup_steps': 0, 'sample_length': 1,
                  'sample_num': 1, 'val_batch_size': 1, 'val_batch_count': 1, 'combine': 1,
                  'seed': 0, 'steps': 0, 'seq_len': 1, 'max_checkpoints': 1}
        optional = {'steps', 'seq_len', 'max_checkpoints', 'weight_decay', 'max_grad_norm'}
        for name, lo in counts.items():
            v = getattr(self, name)
            if v is not None or name not in optional:
                errors.check_whole(name, v, at_least=lo)
        # Comparisons alone let NaN through (NaN < 0 is False), and a rate of -1 trains uphill.
        for name, ok, want in (
                ('learning_rate', lambda x: x > 0, 'a finite number > 0'),
                ('weight_decay', lambda x: x >= 0, 'a finite number >= 0'),
                ('max_grad_norm', lambda x: x > 0,
                 'a finite number > 0 (leave it out for no clipping)'),
                ('noise', lambda x: 0 <= x < 1, 'a probability in [0, 1)')):
            v = getattr(self, name)
            if (v is not None or name not in optional) and not (
                    isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                    and ok(v)):
                raise UserError(f'--{name} must be {want}, got {v!r}')
        errors.check_choice('optimizer', self.optimizer, optim.OPTIMIZERS)
        precision.check_precision(self.precision)
        errors.check_choice('lr_schedule', self.lr_schedule, optim.SCHEDULES)
        errors.check_choice('keep_optimizer_state', self.keep_optimizer_state, (LATEST, ALL),
                            note=f'{LATEST}: the newest checkpoint keeps the optimizer state; '
                                 f'{ALL}: every checkpoint')
        if self.layerwise and self.max_grad_norm:
            raise UserError('--layerwise applies each block\'s update before the next block\'s '
                            'gradient exists, so it cannot clip by the global norm: drop '
                            '--max_grad_norm or --layerwise')
        if self.layerwise and self.precision == 'fp16':
            raise UserError('--layerwise cannot skip a step whose fp16 gradients overflow (its '
                            'first blocks are updated before the last are checked): use '
                            '--precision bf16 with it')
        errors.check_choice('strategy', self.strategy, STRATEGIES,
                            note='none: one device; mirrored: every GPU of this machine; '
                                 'multi_worker: the machines of TF_CONFIG; tpu: --tpu\'s cores')
        if self.tpu is not None and self.strategy != 'tpu':
            raise UserError(f'--tpu {self.tpu!r} names a TPU for --strategy tpu; add it, or drop '
                            '--tpu')
        if self.layerwise and self.strategy != 'none':
            raise UserError('--layerwise applies each block\'s update as its gradient appears, '
                            'before the replicas could average them: use --strategy none with it')
        if self.jit_compile is None:
            object.__setattr__(self, 'jit_compile', compiles_train_step(self.precision))
        if self.weight_decay is None:
            object.__setattr__(self, 'weight_decay', optim.default_weight_decay(self.optimizer))
        if self.curriculum and self.dataset:
            raise UserError('give --dataset or --curriculum, not both')
        if not (self.curriculum or self.dataset):
            raise UserError('no training data: give --dataset (a .npz, text file, folder or glob) '
                            'or --curriculum "a.npz:1000,b.npz:1000"')
        self.order  # a bad --curriculum fails here
        if self.lr_schedule != 'constant' and not self.total_steps:
            raise UserError(f'--lr_schedule {self.lr_schedule} decays to zero at --steps: give '
                            '--steps')

    @property
    def plan(self):
        """[(dataset, steps on it or None)]: the curriculum, or the one dataset."""
        if self.curriculum:
            return dataset.parse_curriculum(self.curriculum)
        return [(self.dataset, None)]

    @property
    def order(self):
        """Which dataset of `plan` each step trains on."""
        return dataset.Curriculum([n for _, n in self.plan], self.save_every)

    @property
    def total_steps(self):
        """The global step training stops at (None: until stopped)."""
        return self.steps if self.steps is not None else self.order.total()

    def learning_rate_at(self, step):
        return optim.scheduled_lr(step, base=self.learning_rate, schedule=self.lr_schedule,
                                  warmup=self.warmup_steps, total=self.total_steps)


def entry_signature(entry, settings, *, only=None, omit=(), lead=None):
    """The signature fire reads for a script's `entry` (its parsing and --help): the parameters
    `entry` declares but its **flags, then the fields of the `settings` dataclass (`only` those,
    or all but `omit` and those `entry` declares) as flags with the dataclass's defaults. So each
    flag's default is written once, and the dataclass fills in what fire leaves out. The fields
    are keyword-only; with `lead`, every flag may also come by position, those named in `lead`
    first (see positional)."""
    kind = inspect.Parameter
    own = [p for p in inspect.signature(entry).parameters.values() if p.kind != kind.VAR_KEYWORD]
    names = {p.name for p in own}
    fields = [kind(f.name, kind.KEYWORD_ONLY, default=f.default)
              for f in dataclasses.fields(settings) if f.name not in names and
              (f.name in only if only is not None else f.name not in omit)]
    if lead is None:
        return inspect.Signature(own + fields)
    # (all of one kind: beside keyword-only flags, fire's --help gives two flags one short name)
    flags = [p.replace(kind=kind.POSITIONAL_OR_KEYWORD) for p in own + fields]
    first = [p for name in lead for p in flags if p.name == name]
    return inspect.Signature(first + [p for p in flags if p.name not in lead])


def positional(entry, signature):
    """`entry` (whose flags are keyword-only) taking `signature`'s flags by position too, as
    fire hands them over: `sample.py 'A prompt'`, `sample.py score notes.txt`."""
    @functools.wraps(entry)
    def call(*args, **flags):
        return entry(**signature.bind(*args, **flags).arguments)
    call.__signature__ = signature
    return call


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The flags sample.py's subcommands share (sampling, palimpsest, score, atlas; their entries'
    docstrings say what each means), with their defaults: what sampling.run_spans reads and the
    library around it passes on. Each subcommand's signature takes those it needs."""
    prompt: object = None             # a string, or a list of them
    prompt_file: str = None
    model_name: str = None            # at most one of these three; none: the 124M model
    run_name: str = None
    checkpoint: str = None
    models_dir: str = paths.MODELS_DIR
    checkpoint_dir: str = paths.CHECKPOINT_DIR
    nsamples: int = 1
    batch_size: int = 1
    length: int = 100
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off
    seed: int = None                  # None: a fresh one, printed (sampling.seeded)
    stop: object = None               # a string, or a list of them
    include_prompt: bool = False
    output: str = None
    samples_dir: str = paths.SAMPLES_DIR
    quiet: bool = False
    xla: bool = True
    dtype: str = 'fp32'               # the decoding copy's: gpt2/precision.py

    @classmethod
    def entry(cls, entry, *, only=None, omit=(), lead=()):
        """A sample.py entry with its own flags and these (entry_signature), every one of them
        also positional, those in `lead` first: the order each took before its flags came from
        here, so a first positional argument means what it meant."""
        return positional(entry, entry_signature(entry, cls, only=only, omit=omit, lead=lead))

    def __post_init__(self):
        # Every value no sampler can use, in one message.
        problems = [errors.not_whole('length', self.length)]
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            problems.append(f'--temperature must be >= 0 (0 = greedy), got {self.temperature!r}')
        problems.append(errors.not_whole('top_k', self.top_k, note='0 = off'))
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            problems.append(f'--top_p must be in (0, 1] (1 = off), got {self.top_p!r}')
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            problems.append(f'--repetition_penalty must be > 0 (1 = off; CTRL used 1.2), '
                            f'got {self.repetition_penalty!r}')
        problems.append(errors.not_whole('nsamples', self.nsamples, at_least=1))
        problems.append(errors.not_whole('batch_size', self.batch_size, at_least=1))
        problems = [p for p in problems if p]
        if problems:
            raise UserError('; '.join(problems))
        precision.check_dtype(self.dtype)
        if sum(x is not None for x in (self.model_name, self.run_name, self.checkpoint)) > 1:
            raise UserError('give one of --model_name, --run_name or --checkpoint, not several')
