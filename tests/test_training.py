"""gpt2/training.py and train.py: the loss against Hugging Face, exact resume, accumulation,
recompute, frozen layers, the curriculum, signals, OpenAI's graph loading what we save."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from gpt2 import checkpoint
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2 import training
from gpt2.errors import UserError
from tests.conftest import OPENAI_117M, ROOT, require_shared

PY = sys.executable


def _npz(path, tokens):
    np.savez(path, np.asarray(tokens, np.int32))
    return str(path)


def _pattern(n=3000, vocab=97, seed=0, lo=0):
    # A learnable stream: a repeating phrase of 17 tokens with a few random substitutions.
    rng = np.random.default_rng(seed)
    t = np.tile(np.arange(17) * 5 % vocab, n // 17 + 1)[:n] + lo
    flip = rng.random(n) < 0.05
    t[flip] = rng.integers(0, vocab, flip.sum())
    return t % vocab


@pytest.fixture
def data(tmp_path):
    return _npz(tmp_path / 'data.npz', _pattern())


def _train(tmp_path, tiny, dataset, **kw):
    opts = dict(from_scratch=True, hparams=tiny, checkpoint_dir=str(tmp_path / 'ckpt'),
                sample_every=0, save_every=0, seq_len=16, batch_size=2, learning_rate=3e-3,
                progress=False)
    opts.update(kw)
    return training.train(dataset, **opts)


def _leaves(tree):
    return {k: np.asarray(v) for k, v in checkpoint.flatten(tree).items()}


def _random_tree(hp, seed):
    # Every leaf random (biases and gains too), so no gradient is trivially zero or one.
    rng = np.random.default_rng(seed)
    flat = {k: (rng.standard_normal(v.shape) * 0.1 + (1 if k.endswith('/g') else 0))
            .astype(np.float32) for k, v in checkpoint.flatten(model.init_params(hp)).items()}
    return checkpoint.unflatten(flat, hp)


def test_loss_falls(tmp_path, tiny, data):
    losses = _train(tmp_path, tiny, data, steps=40, batch_size=4)['losses']
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


def test_checkpoints_appear_at_the_save_steps_and_load(tmp_path, tiny, data):
    out = _train(tmp_path, tiny, data, steps=7, save_every=3, run_name='r', sample_every=3,
                 sample_length=5, sample_num=2, sample_dir=str(tmp_path / 'samples'),
                 val_dataset=data, val_every=3, val_batch_count=2)
    run = out['run_dir']
    # Saves at 3 and 6, and at the end (7); each with its training-state sidecar.
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [3, 6, 7]
    assert all(os.path.isfile(p + training.SIDECAR_SUFFIX)
               for p in checkpoint.list_checkpoints(run))
    assert tf.train.latest_checkpoint(run) == os.path.join(run, 'model-7')
    # Self-contained: sample.py needs only the run folder.
    assert {'hparams.json', 'encoder.json', 'vocab.bpe'} <= set(os.listdir(run))
    params, hp, prefix = checkpoint.load_params(run)
    assert hp == tiny and prefix.endswith('model-7')
    meta, _ = training.load_training_state(prefix)
    assert meta['step'] == 7
    # Samples at the sample steps; TensorBoard scalars in the run folder.
    assert sorted(os.listdir(tmp_path / 'samples' / 'r')) == ['samples-3', 'samples-6']
    assert (tmp_path / 'samples' / 'r' / 'samples-6').read_text().count('SAMPLE') == 2
    events = [os.path.join(run, f) for f in os.listdir(run) if f.startswith('events.out')]
    tags = {v.tag: v for f in events for e in tf.compat.v1.train.summary_iterator(f)
            for v in e.summary.value}
    assert {'loss', 'val_loss', 'learning_rate', 'tokens_per_second'} <= set(tags)
    assert tags['loss'].metadata.plugin_data.plugin_name == 'scalars'


def test_max_checkpoints_deletes_the_oldest(tmp_path, tiny, data):
    run = _train(tmp_path, tiny, data, steps=8, save_every=2, max_checkpoints=2)['run_dir']
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [6, 8]
    assert not [f for f in os.listdir(run) if f.startswith(('model-2', 'model-4'))]


def test_resume_is_bit_for_bit(tmp_path, tiny, data):
    # (A decaying schedule's horizon is --steps, so here the rate is constant after warmup.)
    opts = dict(noise=0.1, warmup_steps=12, max_grad_norm=1.0, optimizer='adamw')
    a = _train(tmp_path, tiny, data, steps=20, run_name='a', **opts)
    b1 = _train(tmp_path, tiny, data, steps=10, run_name='b', **opts)
    b2 = _train(tmp_path, tiny, data, steps=20, run_name='b', **opts)
    assert b2['losses'] == a['losses'][10:] and b1['losses'] == a['losses'][:10]
    pa, pb = _leaves(checkpoint.load_params(a['prefix'])[0]), _leaves(
        checkpoint.load_params(b2['prefix'])[0])
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    (ma, sa), (mb, sb) = (training.load_training_state(x['prefix']) for x in (a, b2))
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert ma['samplers'] == mb['samplers'] and ma['step'] == mb['step'] == 20


def test_resume_from_a_path_and_fresh(tmp_path, tiny, data):
    first = _train(tmp_path, tiny, data, steps=4, save_every=2, run_name='a')
    run = first['run_dir']
    again = _train(tmp_path, tiny, data, steps=6, run_name='c',
                   restore_from=os.path.join(run, 'model-2'))
    assert len(again['losses']) == 4 and again['prefix'].endswith('c/model-6')
    fresh = _train(tmp_path, tiny, data, steps=2, run_name='a', restore_from='fresh')
    assert len(fresh['losses']) == 2


def _windows(hp, n, length, seed=0):
    return np.random.default_rng(seed).integers(0, hp.n_vocab, [n, length]).astype(np.int32)


def test_accumulation_equals_a_bigger_batch(tiny):
    w = _windows(tiny, 4, 17)
    results = []
    for shape in ([1, 4, 17], [2, 2, 17]):
        state = training.TrainState(tiny, model.init_params(tiny, seed=3), 'sgd')
        step = training.make_train_step(tiny, 'sgd')
        losses = [float(step(state, w.reshape(shape), 0.5, t, [0, t])) for t in (1, 2)]
        results.append((losses, _leaves(state.params)))
    (l1, p1), (l2, p2) = results
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], atol=1e-5, err_msg=k)


def test_one_micro_batch_compiles_no_accumulation_loop(tiny):
    """An empty accumulation loop left in the program once kept --memory_saving_gradients from
    saving anything (XLA's temporary buffer at 124M 1 x 1024: 1.11 GB with it, 0.44 without)."""
    state = training.TrainState(tiny, model.init_params(tiny, seed=3), 'adam')
    step = training.make_train_step(tiny, 'adam', recompute=True)
    hlo = {n: step.optimized_hlo(state, _windows(tiny, n, 17).reshape([n, 1, 17]))
           for n in (1, 2)}
    loops = {n: text.count(' while(') for n, text in hlo.items()}
    assert loops[1] == 0 and loops[2] >= 1, loops


def _with_and_without_recompute(hp, jit_compile):
    """Random params, windows, and {recompute: compiled loss_and_grads} for both settings."""
    params = model.to_tensors(_random_tree(hp, 1))
    w = tf.constant(_windows(hp, 2, 20))
    def compiled(recompute):
        return tf.function(lambda p, x: training.loss_and_grads(hp, p, x, recompute=recompute),
                           jit_compile=jit_compile)
    return params, w, {r: compiled(r) for r in (False, True)}


@pytest.mark.parametrize('jit_compile', [False, True])
def test_recompute_gives_the_same_gradients(tiny, jit_compile):
    params, w, fns = _with_and_without_recompute(tiny, jit_compile)
    grads = {r: f(params, w) for r, f in fns.items()}
    np.testing.assert_allclose(grads[True][0], grads[False][0], rtol=1e-6)
    for k, g in grads[False][1].items():
        np.testing.assert_allclose(grads[True][1][k], g, atol=1e-6, err_msg=k)


def test_recompute_reruns_the_blocks_under_xla(tiny):
    """XLA must not merge the rerun with the forward pass (it did once, keeping every block's
    activations, so nothing was saved): the optimized program computes each softmax twice."""
    params, w, fns = _with_and_without_recompute(tiny, True)
    counts = {r: f.experimental_get_compiler_ir(params, w)(stage='optimized_hlo')
              .count(' exponential(') for r, f in fns.items()}
    assert counts[True] >= counts[False] + tiny.n_layer, counts


@pytest.mark.parametrize('rows', [4, 16])
@pytest.mark.parametrize('jit_compile', [False, True])
def test_fused_head_loss_equals_the_whole_logits_loss_and_its_gradients(jit_compile, rows):
    """Blocks of 4 rows over 10 (a short last block), or one block of all 10, against softmax
    cross-entropy on the whole logits, differentiated by TensorFlow."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal([10, 8], dtype=np.float32))
    wte = tf.constant(rng.standard_normal([13, 8], dtype=np.float32))
    t = tf.constant(rng.integers(0, 13, [10]), tf.int32)

    def both(x, wte):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, wte])
            fused = 3 * training.fused_head_loss(x, wte, t, rows=rows)  # upstream gradient != 1
            plain = 3 * tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=t, logits=tf.matmul(x, wte, transpose_b=True)))
        return fused, plain, tape.gradient(fused, [x, wte]), tape.gradient(plain, [x, wte])

    fused, plain, g_fused, g_plain = tf.function(both, jit_compile=jit_compile)(x, wte)
    np.testing.assert_allclose(fused, plain, rtol=1e-6)
    for a, b in zip(g_fused, g_plain):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_transformer_only_leaves_the_embeddings_and_ln_f(tmp_path, tiny, data):
    out = _train(tmp_path, tiny, data, steps=3, only_train_transformer_layers=True)
    after = _leaves(checkpoint.load_params(out['prefix'])[0])
    before = _leaves(model.init_params(tiny, seed=0))
    frozen = ['model/wte', 'model/wpe', 'model/ln_f/g', 'model/ln_f/b']
    assert all(np.array_equal(after[k], before[k]) for k in frozen)
    assert not np.array_equal(after['model/h0/attn/c_attn/w'], before['model/h0/attn/c_attn/w'])
    _, slots = training.load_training_state(out['prefix'])
    assert not [k for k in slots if k.endswith(tuple(frozen))]


def _record_datasets(monkeypatch):
    # Which dataset each step drew from: every window of dataset i starts with token 10 * i.
    seen = []
    real = training.dataset_lib.Sampler.batch

    def batch(self, n):
        seen.append(int(self.chunks[0][0]) // 10)
        return real(self, n)
    monkeypatch.setattr(training.dataset_lib.Sampler, 'batch', batch)
    return seen


def _const_npz(path, i):
    return _npz(path, np.full(200, 10 * i))


def test_curriculum_switches_at_the_given_steps(tmp_path, tiny, monkeypatch):
    a, b = _const_npz(tmp_path / 'a.npz', 0), _const_npz(tmp_path / 'b.npz', 1)
    seen = _record_datasets(monkeypatch)
    out = _train(tmp_path, tiny, None, curriculum=f'{a}:3,{b}:2', save_every=4)
    assert seen == [0, 0, 0, 1, 1] and out['step'] == 5  # stops where the curriculum ends
    # Resumed past the switch, it picks up on the second dataset.
    seen.clear()
    _train(tmp_path, tiny, None, curriculum=f'{a}:3,{b}:2', steps=7, save_every=4)
    assert seen == [1, 1]


def test_curriculum_swaps_at_every_save(tmp_path, tiny, monkeypatch):
    paths = [_const_npz(tmp_path / f'{i}.npz', i) for i in range(3)]
    seen = _record_datasets(monkeypatch)
    _train(tmp_path, tiny, None, curriculum=','.join(paths), save_every=2, steps=8)
    assert seen == [0, 0, 1, 1, 2, 2, 0, 0]


def test_curriculum_parsing():
    assert training.parse_curriculum('a.npz:1000, b.npz:500') == [('a.npz', 1000),
                                                                  ('b.npz', 500)]
    assert training.parse_curriculum('a.txt,c:/x.txt') == [('a.txt', None), ('c:/x.txt', None)]
    with pytest.raises(UserError, match='mixes'):
        training.parse_curriculum('a:10,b')
    with pytest.raises(UserError, match='positive'):
        training.parse_curriculum('a:0')


def test_learning_rate_schedules():
    lr = lambda s, sched: training.scheduled_lr(s, base=1.0, schedule=sched,  # noqa: E731
                                                 warmup=10, total=110)
    assert [lr(s, 'constant') for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    assert lr(60, 'linear') == pytest.approx(0.5) and lr(110, 'linear') == 0
    assert lr(60, 'cosine') == pytest.approx(0.5) and lr(110, 'cosine') == pytest.approx(0)
    with pytest.raises(UserError, match='give --steps'):
        training.scheduled_lr(20, base=1.0, schedule='cosine', total=None)


@pytest.mark.parametrize('name, torch_name', [('adamw', 'AdamW'), ('adam', 'Adam')])
def test_adam_rules_equal_pytorchs(name, torch_name):
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal([3, 4]).astype(np.float32)
    grads = [rng.standard_normal([3, 4]).astype(np.float32) for _ in range(4)]
    rule, wd = training.get_optimizer(name), 0.1
    p, s = tf.constant(p0), {k: tf.constant(v) for k, v in rule.init(p0.shape).items()}
    tp = torch.nn.Parameter(torch.tensor(p0))
    opt = getattr(torch.optim, torch_name)([tp], lr=0.01, weight_decay=wd)
    for t, g in enumerate(grads, 1):
        p, s = rule.update(tf.constant(g), p, s, 0.01, float(t), wd)
        tp.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize('name', ['adafactor', 'sgd', 'adamw'])
def test_every_optimizer_trains(tmp_path, tiny, data, name):
    lr = {'sgd': 0.3, 'adafactor': 1e-2, 'adamw': 3e-3}[name]
    losses = _train(tmp_path, tiny, data, steps=30, batch_size=4, optimizer=name,
                    learning_rate=lr, jit_compile=False)['losses']
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_hugging_face_gives_the_same_loss_and_gradients(tiny):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    tree = _random_tree(tiny, 2)
    flat = _leaves(tree)
    cfg = transformers.GPT2Config(vocab_size=tiny.n_vocab, n_positions=tiny.n_ctx,
                                  n_embd=tiny.n_embd, n_layer=tiny.n_layer, n_head=tiny.n_head,
                                  activation_function='gelu_new', resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(cfg).float()

    def hf_name(k):
        # model/h0/attn/c_attn/w -> transformer.h.0.attn.c_attn.weight (HF's Conv1D w is w[0])
        k = k[len('model/'):]
        k = k.replace('/w', '/weight').replace('/g', '/weight').replace('/b', '/bias')
        if k in ('wte', 'wpe'):
            k += '/weight'
        parts = k.split('/')
        if parts[0].startswith('h'):
            parts = ['h', parts[0][1:]] + parts[1:]
        return 'transformer.' + '.'.join(parts)

    def hf_value(k, v):
        return v[0] if v.ndim == 3 else v

    state = {hf_name(k): torch.tensor(hf_value(k, v)) for k, v in flat.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(m == 'lm_head.weight' or 'attn.bias' in m or 'masked_bias' in m
                                  for m in missing)
    w = _windows(tiny, 3, tiny.n_ctx)
    x = torch.tensor(w, dtype=torch.long)
    out = hf(input_ids=x, labels=x)  # HF shifts: predicts x[:, 1:] from x[:, :-1], as we do
    out.loss.backward()
    grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    loss, ours = training.loss_and_grads(tiny, model.to_tensors(tree), tf.constant(w))
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), atol=1e-4)
    for k, g in ours.items():
        np.testing.assert_allclose(hf_value(k, g.numpy()), grads[hf_name(k)], atol=1e-4,
                                   err_msg=k)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny, data):
    with pytest.raises(UserError, match=r'loss became (nan|inf).*last good checkpoint .*model-1'):
        _train(tmp_path, tiny, data, steps=10, save_every=1, optimizer='sgd',
               learning_rate=1e30)
    run = str(tmp_path / 'ckpt' / training.RUN_NAME)
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [1]


def test_bad_input_is_a_user_error(tmp_path, tiny, data):
    short = _npz(tmp_path / 'short.npz', np.arange(10))
    with pytest.raises(UserError, match='too short for windows of 17 tokens'):
        _train(tmp_path, tiny, short)
    with pytest.raises(UserError, match=r'not downloaded.*download_model.py 124M'):
        training.train(data, models_dir=str(tmp_path / 'models'), progress=False)
    with pytest.raises(UserError, match='unknown optimizer .adamx.'):
        _train(tmp_path, tiny, data, optimizer='adamx')
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match='cannot write to the checkpoint folder'):
        _train(tmp_path, tiny, data, checkpoint_dir=str(tmp_path / 'file'), steps=1)
    _train(tmp_path, tiny, data, steps=1, run_name='r')
    wider = hparams_lib.HParams(**{**tiny.to_dict(), 'n_embd': 64})
    with pytest.raises(UserError, match="holds a model with hparams .*'n_embd': 32"):
        _train(tmp_path, wider, data, steps=2, run_name='r')


def _script(tmp_path, tiny, data, *args):
    hp = tmp_path / 'hp.json'
    hp.write_text(json.dumps(tiny.to_dict()))
    return [PY, os.path.join(ROOT, 'train.py'), '--dataset', data, '--from_scratch',
            '--hparams', str(hp), '--checkpoint_dir', str(tmp_path / 'ckpt'), '--seq_len', '16',
            '--sample_every', '0', *args]


def test_script_errors_are_one_line(tmp_path, tiny, data):
    out = subprocess.run(_script(tmp_path, tiny, data, '--optimizer', 'adamx'),
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith('train.py: error: unknown optimizer')
    assert 'Traceback' not in out.stderr


def test_sigint_saves_a_loadable_checkpoint_and_exits_0(tmp_path, tiny, data):
    proc = subprocess.Popen(_script(tmp_path, tiny, data, '--steps', '100000', '--save_every',
                                    '100000'), stderr=subprocess.PIPE, cwd=tmp_path)
    seen, deadline = b'', time.time() + 120
    while b'step=3 ' not in seen and time.time() < deadline and proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    params, hp, prefix = checkpoint.load_params(str(tmp_path / 'ckpt' / training.RUN_NAME))
    assert hp == tiny and checkpoint.step_of(prefix) >= 3
    meta, _ = training.load_training_state(prefix)
    assert meta['step'] == checkpoint.step_of(prefix)


@pytest.mark.slow
def test_openais_graph_restores_a_checkpoint_saved_by_train_py(tmp_path, data):
    require_shared()
    hp_path = os.path.join(OPENAI_117M, 'hparams.json')
    tokens = _npz(tmp_path / 'd.npz', _pattern(vocab=50257))
    cmd = [PY, os.path.join(ROOT, 'train.py'), '--dataset', tokens, '--from_scratch', '--hparams',
           hp_path, '--checkpoint_dir', str(tmp_path / 'ckpt'), '--seq_len', '8', '--steps', '1',
           '--sample_every', '0', '--noprogress']
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    prefix = str(tmp_path / 'ckpt' / training.RUN_NAME / 'model-1')
    ours = tf.train.load_checkpoint(prefix)
    with tf.Graph().as_default():
        saver = tf.compat.v1.train.import_meta_graph(os.path.join(OPENAI_117M, 'model.ckpt.meta'))
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, prefix)
            names = [v.name[:-2] for v in tf.compat.v1.global_variables()]
            for name in ('model/wte', 'model/h11/mlp/c_proj/w', 'model/ln_f/g'):
                var = [v for v in tf.compat.v1.global_variables() if v.name[:-2] == name][0]
                np.testing.assert_array_equal(sess.run(var), ours.get_tensor(name))
    assert set(names) == set(checkpoint.shapes(hparams_lib.load(hp_path)))
