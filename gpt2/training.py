"""The training loop: train.py's run from its settings (gpt2/settings.py) to its last checkpoint.
The step is gpt2/step.py's or gpt2/layerwise.py's; the run folder and resume, gpt2/runs.py's."""
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
from gpt2 import novelty
from gpt2 import paths
from gpt2 import runlog
from gpt2 import runs
from gpt2 import sampling
from gpt2 import step as step_lib
from gpt2.errors import UserError


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
    seq = hp.n_ctx if s.seq_len is None else s.seq_len
    if not 1 <= seq <= hp.n_ctx:
        raise UserError(f'--seq_len must be in 1..n_ctx ({hp.n_ctx}), got {seq!r}')
    if os.path.isfile(os.path.join(run_dir, runs.VOCAB_FILES[0])):
        vocab_dir = run_dir
    enc = encoder_lib.get_encoder(None if vocab_dir == runs.ENCODER_DIR else vocab_dir)
    plan, order, total = s.plan, s.order, s.total_steps
    samplers = [dataset_lib.Sampler(dataset_lib.load_chunks(p, enc, combine=s.combine), seq + 1,
                                    seed=s.seed + i) for i, (p, _) in enumerate(plan)]
    val_batches = []
    if s.val_dataset and s.val_every:
        val_batches = dataset_lib.validation_batches(
            dataset_lib.load_chunks(s.val_dataset, enc, combine=s.combine), seq + 1,
            s.val_batch_size, s.val_batch_count)
    if chief:
        runs.prepare(s, hp, vocab_dir)

    with distribute.scope(strategy):
        state = step_lib.TrainState(hp, params, s.optimizer,
                                    only_transformer=s.only_train_transformer_layers, consume=True)
    del params
    step, avg = runs.resume(s, state, samplers, prefix)
    distribute.check_same_start(strategy, step)
    skipped = state.scaler_state()['skipped']

    def save():
        if not chief:   # the chief writes what every worker holds
            return os.path.join(run_dir, f'model-{step}')
        log.sync()  # a checkpoint never exists without the log lines that led to it
        return runs.save(state, os.path.join(run_dir, f'model-{step}'),
                         runs.meta(s, step, samplers, avg, hp, state), keep=s.max_checkpoints,
                         keep_optimizer_state=s.keep_optimizer_state)

    if s.layerwise:
        train_step = layerwise.make_layerwise_step(hp, s.optimizer, weight_decay=s.weight_decay,
                                                   noise=s.noise, precision=s.precision,
                                                   jit_compile=s.jit_compile)
    else:
        train_step = step_lib.make_train_step(hp, s.optimizer, weight_decay=s.weight_decay,
                                              max_grad_norm=s.max_grad_norm,
                                              recompute=s.memory_saving_gradients, noise=s.noise,
                                              precision=s.precision, jit_compile=s.jit_compile,
                                              strategy=strategy)
    eval_step = step_lib.make_eval_step(hp, jit_compile=s.jit_compile) if val_batches else None
    writer = tf.summary.create_file_writer(run_dir) if chief else tf.summary.create_noop_writer()
    losses, saved, last = [], None, prefix
    tokens = s.batch_size * s.accumulate_gradients * seq
    bar = tqdm.tqdm(total=total, initial=step, disable=not s.progress, dynamic_ncols=True,
                    unit='step')
    log = runlog.Log(run_dir, step) if chief else runlog.Nowhere()
    try:
        with _Stop() as stop, writer.as_default():
            while (total is None or step < total) and not distribute.agree_to_stop(
                    strategy, stop.signal is not None):
                windows = samplers[order.index(step)].batch(
                    s.batch_size * s.accumulate_gradients).reshape(
                    s.accumulate_gradients, s.batch_size, seq + 1)
                lr = s.learning_rate_at(step)
                t0 = time.perf_counter()
                loss = float(train_step(state, windows, lr, step + 1, [s.seed, step]))
                rate = tokens / (time.perf_counter() - t0)
                scaler = state.scaler_state() if s.precision == 'fp16' else None
                if scaler and scaler['skipped'] > skipped:   # the gradients overflowed
                    skipped = scaler['skipped']
                    if scaler['scale'] < 1:
                        raise UserError(f'fp16 gradients overflowed at every loss scale down to '
                                        f'{scaler["scale"]:g} (step {step + 1}); train with '
                                        '--precision bf16 or fp32')
                elif not math.isfinite(loss):
                    raise UserError(f'the loss became {loss} at step {step + 1}, so training '
                                    f'stopped; the last good checkpoint is {last or "none"}. '
                                    'Lower --learning_rate or set --max_grad_norm')
                step += 1
                losses.append(loss)
                avg = [avg[0] * 0.99 + loss, avg[1] * 0.99 + 1]
                _scalar('loss', loss, step=step)
                _scalar('learning_rate', lr, step=step)
                _scalar('tokens_per_second', rate, step=step)
                note = ''
                if scaler:
                    _scalar('loss_scale', scaler['scale'], step=step)
                    _scalar('skipped_steps', skipped, step=step)
                    note = f' skipped={skipped}'
                bar.update(1)
                bar.set_postfix_str(f'step={step} loss={loss:.3f} avg={avg[0] / avg[1]:.3f} '
                                    f'tok/s={rate:.0f}{note}')
                record = {'step': step, 'loss': loss, 'learning_rate': lr,
                          'tokens_per_second': rate}
                if scaler:
                    record.update(loss_scale=scaler['scale'], skipped_steps=skipped)
                if val_batches and step % s.val_every == 0:
                    val = float(np.mean([eval_step(state.params, b) for b in val_batches]))
                    _scalar('val_loss', val, step=step)
                    bar.write(f'step {step}: validation loss {val:.4f}')
                    record['val_loss'] = val
                log.write(record)
                if s.save_every and step % s.save_every == 0:
                    last = saved = save()
                    writer.flush()
                if chief and s.sample_every and step % s.sample_every == 0:
                    _samples(hp, state, enc, os.path.join(s.sample_dir, s.run_name,
                                                          f'samples-{step}'),
                             num=s.sample_num, length=s.sample_length, seed=s.seed + step)
            if losses and saved != os.path.join(run_dir, f'model-{step}'):
                last = save()
            if stop.signal is not None:
                bar.write(f'stopped by signal {stop.signal} at step {step}; saved {last}')
    except distribute.PEER_FAILURES as e:
        if not distribute.is_multi_worker(strategy):
            raise
        raise UserError(f'{distribute.dead_peer(strategy, e)} at step {step + 1}, so training '
                        f'stopped; the last checkpoint is {last or "none"}') from None
    finally:
        bar.close()
        writer.flush()
        log.close()
    return {'step': step, 'prefix': last, 'losses': losses, 'run_dir': run_dir}


def _samples(hparams, state, enc, path, *, num, length, seed):
    """Unconditional samples from the current weights to samples/RUN/samples-STEP (and the log)."""
    out = sampling.generate(hparams, state.params, nsamples=num, batch_size=num, length=length,
                            seed=seed)
    text = novelty.format_samples([enc.decode(t) for t in out])
    paths.write_text(path, text)
    tqdm.tqdm.write(text)
