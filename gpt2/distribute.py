"""train.py --strategy: the same step on several devices (MirroredStrategy), machines
(MultiWorkerMirroredStrategy, from TF_CONFIG) or TPU cores (TPUStrategy), through tf.distribute.

The step is step.make_train_step's two halves. On each replica, gradients() of its slice of
the global batch runs compiled (XLA where the step is compiled; the forward and backward pass);
the all-reduce that sums the gradients over the replicas runs outside it, since XLA cannot hold
a cross-worker collective (tensorflow/tensorflow#58961) and a merge_call must not sit inside a
nested compiled function (keras-team/keras-hub#949); then update() (the mean, unscale, clip, the
optimizer) runs compiled on each device's own copy of the weights, with the same summed
gradients, so every copy stays equal without a broadcast.

Every worker draws the same global batch from the same seeded stream and takes its replicas'
rows, so a run's data, and its checkpoints, do not depend on the number of replicas."""
import contextlib
import json
import os
import re
import socket
import urllib.parse

import tensorflow as tf

from gpt2 import fast
from gpt2.errors import UserError

# How long a collective waits for the other workers before it fails (the first step waits for
# every worker's compile; a checkpoint save of 1558M takes tens of seconds).
COLLECTIVE_TIMEOUT_S = float(os.environ.get('GPT2_COLLECTIVE_TIMEOUT', 600))
TPU_CONNECT_TIMEOUT_S = 10
# What a collective raises when a peer has gone (killed, its machine down, the network cut).
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                 tf.errors.CancelledError, tf.errors.AbortedError)


def make_strategy(name, tpu=None):
    """The tf.distribute strategy for --strategy `name` (None for 'none': the plain step), or a
    UserError saying why it cannot be had here. Call before TensorFlow runs anything else (a
    multi-worker or TPU strategy sets up the runtime)."""
    if name == 'none':
        return None
    if name == 'mirrored':
        # Every GPU, else every (logical) CPU device: one replica each.
        devices = tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU')
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == 'multi_worker':
        _check_tf_config(os.environ.get('TF_CONFIG'))
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_S)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    assert name == 'tpu', name
    return _tpu_strategy(tpu)


def _check_tf_config(text):
    how = ('see README "Several devices and machines" for a two-machine example')
    if not text:
        raise UserError(f'--strategy multi_worker takes its cluster from the TF_CONFIG '
                        f'environment variable, which is not set; {how}')
    try:
        config = json.loads(text)
        workers = config['cluster']['worker'] + config['cluster'].get('chief', [])
        task = config['task']
        role = (task['type'], int(task['index']))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'TF_CONFIG is not {{"cluster": {{"worker": [...]}}, "task": {{"type": '
                        f'..., "index": ...}}}} ({type(e).__name__}: {e}); {how}') from None
    if role[0] not in ('worker', 'chief') or not 0 <= role[1] < len(
            config['cluster'][role[0]]):
        raise UserError(f'TF_CONFIG\'s task {task} is not one of its cluster\'s '
                        f'{len(workers)} workers; {how}')


def _tpu_strategy(address):
    resolver_type = tf.distribute.cluster_resolver.TPUClusterResolver
    where = f'at {address}' if address else 'on this machine (no --tpu given)'
    try:
        resolver = resolver_type(tpu=address)
        master = resolver.master()
        if master.startswith('grpc://'):
            # A gRPC address TensorFlow would wait on for ever: a plain TCP connect first.
            url = urllib.parse.urlsplit(master)
            socket.create_connection((url.hostname, url.port), TPU_CONNECT_TIMEOUT_S).close()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'no TPU reachable {where} ({why}); give --tpu the TPU\'s name or '
                        'grpc://ADDRESS:8470, or train with --strategy none or mirrored') from None
    return tf.distribute.TPUStrategy(resolver)


def replicas(strategy):
    return 1 if strategy is None else strategy.num_replicas_in_sync


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes the run's files: the only one, or the chief of a cluster."""
    return strategy is None or strategy.extended.should_checkpoint


def check_batch(strategy, batch_size, name):
    """UserError unless the global batch splits evenly over the replicas."""
    n = replicas(strategy)
    if batch_size % n:
        raise UserError(f'--batch_size {batch_size} does not split evenly over the {n} replicas '
                        f'of --strategy {name}: give a multiple of {n} (it is the global batch, '
                        'shared out among the replicas)')


def scope(strategy):
    """Where the trained variables are made: the strategy's scope, or nowhere special."""
    return contextlib.nullcontext() if strategy is None else strategy.scope()


def make_step(strategy, gradients, update, *, scaled, noised, jit_compile):
    """step.make_train_step's step under `strategy`: the same call(state, windows, lr, t,
    seed) -> the global mean loss, windows [accumulate, global batch, seq+1]."""
    n = strategy.num_replicas_in_sync
    gradients = fast.function(gradients, jit_compile=jit_compile)

    @tf.function(jit_compile=jit_compile)
    def update_by_mean(params, slots, scaler, grads, lr, t):
        # The replicas' summed gradients -> their mean, inside the compiled update (no pass
        # over the gradients of its own).
        update(params, slots, scaler, [g / n for g in grads], lr, t)
    devices = strategy.extended.worker_devices
    total = tf.distribute.ReduceOp.SUM

    @tf.function
    def step(params, slots, scaler, windows, inputs, lr, t):
        names = tuple(sorted(slots))

        def on_replica(w, x):
            scale = scaler['scale'].read_value() if scaled else None
            loss, grads = gradients(params, names, scale, w, x)
            # Outside the compiled gradients: the sums over every replica's slice (the loss's
            # mean here, the gradients' in update_by_mean).
            loss, grads = tf.distribute.get_replica_context().all_reduce(total, (loss, grads))
            return loss / n, grads

        loss, grads = strategy.run(on_replica, args=(windows, inputs))
        for i, device in enumerate(devices):
            with tf.device(device):
                update_by_mean(*_local((params, slots, scaler, grads), strategy, i), lr, t)
        return strategy.experimental_local_results(loss)[0]

    def call(state, windows, lr, t, seed):
        windows = tf.constant(windows, tf.int32)
        inputs = noised(windows[:, :, :-1], tf.constant(seed, tf.int32))
        return step(state.params, state.slots, state.scaler, _split(strategy, windows),
                    _split(strategy, inputs), tf.constant(lr, tf.float32),
                    tf.constant(t, tf.float32))

    call.tracing_count = lambda: (gradients.experimental_get_tracing_count() +
                                  update_by_mean.experimental_get_tracing_count())
    return call


def _local(tree, strategy, i):
    # The i-th local replica's copy of every variable or per-replica value in `tree`.
    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[i], tree)


def _split(strategy, batch):
    """[accumulate, global batch, ...] -> each replica's rows of the batch axis, by its place in
    the whole cluster (so worker 1's replica takes the second slice of the same global batch)."""
    n = strategy.num_replicas_in_sync
    rows = batch.shape[1] // n

    def part(ctx):
        r = ctx.replica_id_in_sync_group
        return batch[:, r * rows:(r + 1) * rows]
    return strategy.experimental_distribute_values_from_function(part)


def _gathered(strategy, value, op):
    # `value` (an int) of every worker combined by the collective `op` on a local replica.
    @tf.function
    def combine(x):
        # (made on the replica's device: a host tensor handed in has no device to reduce on)
        return strategy.run(lambda: op(tf.distribute.get_replica_context(), tf.identity(x)))
    return strategy.experimental_local_results(combine(tf.constant([value], tf.int64)))[0].numpy()


def agree_to_stop(strategy, stop):
    """Whether any worker was told to stop (Ctrl-C, SIGTERM): all then stop after the same step,
    so the chief's last save is everyone's."""
    if not is_multi_worker(strategy):
        return stop
    return bool(_gathered(strategy, int(stop), lambda ctx, v: ctx.all_reduce(
        tf.distribute.ReduceOp.SUM, v))[0])


def check_same_start(strategy, step):
    """UserError unless every worker resumes from the same step (a run folder the workers do not
    share, or one that changed under them, would train on different weights)."""
    if not is_multi_worker(strategy):
        return
    steps = [int(v) for v in _gathered(strategy, step, lambda ctx, v: ctx.all_gather(v, 0))]
    if len(set(steps)) > 1:
        raise UserError(f'the workers resume at different steps ({", ".join(map(str, steps))}; '
                        'worker by worker): every worker must read the same run folder, on a '
                        'shared disk, and only the chief writes it')


def dead_peer(strategy, error):
    """A one-line account of `error`, a collective that failed because a peer went, naming the
    worker(s) it was waiting on where TensorFlow's message says."""
    me = strategy.cluster_resolver
    peers = sorted({(job, int(task)) for job, task in
                    re.findall(r'/job:(\w+)/replica:\d+/task:(\d+)', str(error))}
                   - {(me.task_type, me.task_id)})
    who = ', '.join(f'{job} {task}' for job, task in peers) or 'a worker'
    return f'{who} stopped answering ({type(error).__name__})'
