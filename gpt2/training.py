"""The training loop: train.py's run from its settings (gpt2/settings.py) to its last checkpoint,
each step recorded in one place (TensorBoard, the progress bar, log.jsonl), validating, saving and
sampling every N steps. The step is gpt2/step.py's or layerwise.py's; the run folder, runs.py's."""
import math
import os
import signal
import threading
import time

import numpy as np
import tensorflow as tf
import tqdm
from tensorflow.core.framework import summary_pb2

import encoder as encoder_lib
from gpt2 import dataset as dataset_lib
from gpt2 import distribute
from gpt2 import layerwise
from gpt2 import paths
from gpt2 import runlog
from gpt2 import runs
from gpt2 import samples_file
from gpt2 import sampling
from gpt2 import step as step_lib
from gpt2.errors import UserError


def run(s):
    """Train with settings `s` until step s.total_steps (the global step, so a resumed run stops
    at the same place), the end of the curriculum, or Ctrl-C/SIGTERM (the step in flight finishes
    and is saved). Returns {'step', 'prefix' (the last checkpoint), 'losses' (this call's),
    'run_dir'}.

    Under --strategy (gpt2/distribute.py) every worker runs this loop on the same data; only the
    chief writes the run folder, samples and events, and all stop after the same step."""
    strategy = distribute.make_strategy(s.strategy, s.tpu)  # before TensorFlow runs anything
    distribute.check_batch(strategy, s.batch_size, s.strategy)
    chief = distribute.is_chief(strategy)
    run_dir = runs.folder(s)
    hp, params, prefix, vocab_dir = runs.start(s)
    seq = _window_len(s, hp)
    vocab_dir = runs.vocab_folder(run_dir, vocab_dir)
    enc = encoder_lib.get_encoder(None if vocab_dir == runs.ENCODER_DIR else vocab_dir)
    samplers, val_batches = _data(s, enc, seq)
    if chief:
        runs.prepare(s, hp, vocab_dir)
    with distribute.scope(strategy):
        state = step_lib.TrainState(hp, params, s.optimizer,
                                    only_transformer=s.only_train_transformer_layers, consume=True)
    del params
    step, avg = runs.resume(s, state, samplers, prefix)
    distribute.check_same_start(strategy, step)
    skipped = state.scaler_state()['skipped']
    train_step = _make_step(s, hp, strategy)
    eval_step = step_lib.make_eval_step(hp, jit_compile=s.jit_compile) if val_batches else None
    order, total = s.order, s.total_steps
    recorder = _Recorder(s, run_dir, step, chief)
    losses, saved, last = [], None, prefix
    tokens = s.batch_size * s.accumulate_gradients * seq

    def save():   # -> model-STEP's prefix; the chief writes what every worker holds
        path = os.path.join(run_dir, f'model-{step}')
        if not chief:
            return path
        recorder.log.sync()  # a checkpoint never exists without the log lines that led to it
        return runs.save(state, path, runs.meta(s, step, samplers, avg, hp, state),
                         keep=s.max_checkpoints, keep_optimizer_state=s.keep_optimizer_state)

    try:
        with _Stop() as stop, recorder.writer.as_default():
            while (total is None or step < total) and not distribute.agree_to_stop(
                    strategy, stop.signal is not None):
                windows = _windows(s, samplers[order.index(step)], seq)
                lr = s.learning_rate_at(step)
                t0 = time.perf_counter()
                loss = float(train_step(state, windows, lr, step + 1, [s.seed, step]))
                rate = tokens / (time.perf_counter() - t0)
                scaler = state.scaler_state() if s.precision == 'fp16' else None
                skipped = _check_loss(loss, scaler, skipped, step + 1, last)
                step += 1
                losses.append(loss)
                avg = [avg[0] * 0.99 + loss, avg[1] * 0.99 + 1]
                record = {'step': step, 'loss': loss, 'learning_rate': lr,
                          'tokens_per_second': rate}
                if scaler:
                    record.update(loss_scale=scaler['scale'], skipped_steps=skipped)
                if val_batches and step % s.val_every == 0:
                    record['val_loss'] = float(np.mean([eval_step(state.params, b)
                                                        for b in val_batches]))
                recorder.write(record, avg)
                if s.save_every and step % s.save_every == 0:
                    last = saved = save()
                    recorder.writer.flush()
                if chief and s.sample_every and step % s.sample_every == 0:
                    _samples(hp, state, enc, os.path.join(s.sample_dir, s.run_name,
                                                          f'samples-{step}'),
                             num=s.sample_num, length=s.sample_length, seed=s.seed + step)
            if losses and saved != os.path.join(run_dir, f'model-{step}'):
                last = save()
            if stop.signal is not None:
                recorder.bar.write(f'stopped by signal {stop.signal} at step {step}; saved {last}')
    except distribute.PEER_FAILURES as e:
        if not distribute.is_multi_worker(strategy):
            raise
        raise UserError(f'{distribute.dead_peer(strategy, e)} at step {step + 1}, so training '
                        f'stopped; the last checkpoint is {last or "none"}') from None
    finally:
        recorder.close()
    return {'step': step, 'prefix': last, 'losses': losses, 'run_dir': run_dir}


# ---------------------------------------------------------------- setting up

def _window_len(s, hp):
    """The tokens a window trains on: --seq_len, or the model's n_ctx."""
    seq = hp.n_ctx if s.seq_len is None else s.seq_len
    if not 1 <= seq <= hp.n_ctx:
        raise UserError(f'--seq_len must be in 1..n_ctx ({hp.n_ctx}), got {seq!r}')
    return seq


def _data(s, enc, seq):
    """A window sampler per dataset of the plan (each seeded apart), and the fixed validation
    batches ([] without --val_dataset and --val_every)."""
    samplers = [dataset_lib.Sampler(dataset_lib.load_chunks(p, enc, combine=s.combine), seq + 1,
                                    seed=s.seed + i) for i, (p, _) in enumerate(s.plan)]
    val_batches = []
    if s.val_dataset and s.val_every:
        val_batches = dataset_lib.validation_batches(
            dataset_lib.load_chunks(s.val_dataset, enc, combine=s.combine), seq + 1,
            s.val_batch_size, s.val_batch_count)
    return samplers, val_batches


def _make_step(s, hp, strategy):
    """The train step the settings ask for: a block at a time (--layerwise) or the whole model."""
    if s.layerwise:
        return layerwise.make_layerwise_step(hp, s.optimizer, weight_decay=s.weight_decay,
                                             noise=s.noise, precision=s.precision,
                                             jit_compile=s.jit_compile)
    return step_lib.make_train_step(hp, s.optimizer, weight_decay=s.weight_decay,
                                    max_grad_norm=s.max_grad_norm,
                                    recompute=s.memory_saving_gradients, noise=s.noise,
                                    precision=s.precision, jit_compile=s.jit_compile,
                                    strategy=strategy)


# ---------------------------------------------------------------- each step

def _windows(s, sampler, seq):
    """A step's windows [accumulate, batch, seq+1], drawn at once: accumulating 2 x 2 trains on
    the windows a batch of 4 would."""
    return sampler.batch(s.batch_size * s.accumulate_gradients).reshape(
        s.accumulate_gradients, s.batch_size, seq + 1)


def _check_loss(loss, scaler, skipped, step, last):
    """The fp16 steps skipped so far, after step `step` (a skip is an overflow of the gradients,
    which lowers the scale: an error once it falls below 1); any other loss that is not finite
    stops training."""
    if scaler and scaler['skipped'] > skipped:   # the gradients overflowed
        if scaler['scale'] < 1:
            raise UserError(f'fp16 gradients overflowed at every loss scale down to '
                            f'{scaler["scale"]:g} (step {step}); train with '
                            '--precision bf16 or fp32')
        return scaler['skipped']
    if not math.isfinite(loss):
        raise UserError(f'the loss became {loss} at step {step}, so training stopped; the last '
                        f'good checkpoint is {last or "none"}. Lower --learning_rate or set '
                        '--max_grad_norm')
    return skipped


class _Recorder:
    """The one place a step is recorded: TensorBoard's scalars in the run folder, the progress
    bar, and the run's log.jsonl (workers other than the chief write no file)."""

    def __init__(self, s, run_dir, step, chief):
        self.writer = (tf.summary.create_file_writer(run_dir) if chief else
                       tf.summary.create_noop_writer())
        self.bar = tqdm.tqdm(total=s.total_steps, initial=step, disable=not s.progress,
                             dynamic_ncols=True, unit='step')
        self.log = runlog.Log(run_dir, step) if chief else runlog.Nowhere()

    def write(self, record, avg):
        """A step's record ({'step', 'loss', 'learning_rate', 'tokens_per_second'}; with fp16
        'loss_scale' and 'skipped_steps'; at a validation 'val_loss') to all three; `avg` is the
        running loss average [sum, weight] the bar shows."""
        step = record['step']
        for name, value in record.items():
            if name != 'step':
                _scalar(name, value, step=step)
        note = f' skipped={record["skipped_steps"]}' if 'skipped_steps' in record else ''
        self.bar.update(1)
        self.bar.set_postfix_str(f'step={step} loss={record["loss"]:.3f} '
                                 f'avg={avg[0] / avg[1]:.3f} '
                                 f'tok/s={record["tokens_per_second"]:.0f}{note}')
        if 'val_loss' in record:
            self.bar.write(f'step {step}: validation loss {record["val_loss"]:.4f}')
        self.log.write(record)

    def close(self):
        self.bar.close()
        self.writer.flush()
        self.log.close()


class _Stop:
    """Ctrl-C / SIGTERM set a flag the loop reads between steps (the step in flight finishes and
    is saved); a second signal interrupts at once."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _scalar(name, value, step):
    # tf.summary.scalar lives in the tensorboard package; this is what it writes, without it.
    meta = summary_pb2.SummaryMetadata()
    meta.plugin_data.plugin_name = 'scalars'
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=meta)


def _samples(hparams, state, enc, path, *, num, length, seed):
    """Unconditional samples from the current weights to samples/RUN/samples-STEP (and the log)."""
    out = sampling.generate(hparams, state.params, nsamples=num, batch_size=num, length=length,
                            seed=seed)
    text = samples_file.format_samples([enc.decode(t) for t in out])
    paths.write_text(path, text)
    tqdm.tqdm.write(text)
