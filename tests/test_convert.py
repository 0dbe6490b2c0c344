"""gpt2/convert.py and convert.py: checkpoints to and from Hugging Face folders, with transformers
itself as the oracle (its model loads what to_hf writes and gives our logits, its tokenizer gives
our ids, its greedy generate continues a prompt as sample.py does), a round trip that changes no
byte, and every bad folder refused in one line.

The models are small (n_embd 64, n_ctx 64) but keep GPT-2's real vocabulary of 50257 tokens, so
the tokenizers compared are the real ones. torch and transformers are imported inside the tests
(collection stays fast); under CI=true their absence fails (tests/conftest.py).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import encoder as encoder_lib
from gpt2 import checkpoint
from gpt2 import convert
from gpt2 import hparams as hparams_lib
from gpt2 import model
from gpt2.errors import UserError
from tests import helpers
from tests.conftest import CORPORA, ROOT, corpus_files, real_text
from tests.helpers import lively_params

PY = sys.executable
HP = hparams_lib.HParams(n_vocab=50257, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
LOGIT_TOL = 1e-4  # max |ours - transformers| over the logits (fp32 both sides; measured ~1e-6)


def _transformers():
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" etc.
    return torch, transformers


def _script(*argv, cwd=ROOT):
    """A script in a subprocess (120 s is a hang guard) -> (exit code, stdout, stderr)."""
    out = subprocess.run([PY, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                         timeout=120)
    return out.returncode, out.stdout, out.stderr


def _flat(prefix):
    """{name: array} exactly as the checkpoint's files hold them."""
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A run folder that helpers.train (train.py's loop) wrote: one step of fine-tuning from a
    model folder whose every parameter is random (biases and gains too, so a dropped or swapped
    one shows in the logits)."""
    root = tmp_path_factory.mktemp('trained')
    checkpoint.save_params(lively_params(HP, 3), str(root / 'models' / 'base' / 'model.ckpt'),
                           hparams=HP)
    res = helpers.train(os.path.join(CORPORA, 'tao.txt'), model_name='base',
                        models_dir=str(root / 'models'), checkpoint_dir=str(root / 'ckpt'),
                        run_name='run', steps=1, save_every=0, sample_every=0, seq_len=16,
                        batch_size=1, learning_rate=1e-3, jit_compile=False, progress=False)
    return res['run_dir'], res['prefix']


@pytest.fixture(scope='module')
def hf_dir(trained, tmp_path_factory):
    """`convert.py to_hf RUN_DIR OUT_DIR` on the trained run (the real command line)."""
    out = tmp_path_factory.mktemp('hf') / 'out'
    code, stdout, err = _script('convert.py', 'to_hf', trained[0], out)
    assert code == 0, err
    assert trained[1] in stdout
    return str(out)


@pytest.fixture(scope='module')
def hf_random(tmp_path_factory):
    """A 6-layer GPT2LMHeadModel made by transformers with every parameter random, saved by its
    own save_pretrained (safetensors) with GPT-2's tokenizer (which transformers 5 saves as
    tokenizer.json alone) -> (folder, model, tokenizer)."""
    torch, transformers = _transformers()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=HP.n_vocab, n_positions=HP.n_ctx, n_embd=HP.n_embd,
                                  n_head=HP.n_head, n_layer=6)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # transformers starts biases at 0 and gains at 1
            p.add_(torch.randn_like(p) * 0.2)
    vocab, merges = encoder_lib.vocab_files()
    tok = transformers.GPT2Tokenizer(vocab, merges)
    folder = str(tmp_path_factory.mktemp('hf_random') / 'gpt2-6')
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, hf, tok


# ---------------------------------------------------------------- ours -> transformers

def test_transformers_loads_it_and_gives_our_logits(trained, hf_dir):
    """Catches: a transposed Conv1D (shapes fail to load, or square c_proj gives other
    logits), a wrong name (transformers initialises that weight at random), a config that
    changes the math (epsilon, GELU)."""
    torch, transformers = _transformers()
    config = json.load(open(os.path.join(hf_dir, 'config.json')))
    assert config['architectures'] == ['GPT2LMHeadModel'] and config['model_type'] == 'gpt2'
    assert config['tie_word_embeddings'] and config['eos_token_id'] == encoder_lib.EOT_ID
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    params, hp, _ = checkpoint.load_params(trained[1])
    ids = encoder_lib.get_encoder(trained[0]).encode(real_text(2000))[:2 * hp.n_ctx]
    tokens = np.asarray(ids, np.int32).reshape(2, hp.n_ctx)
    ours, _ = model.forward(hp, model.to_tensors(params), tf.constant(tokens))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    diff = float(np.abs(np.asarray(ours) - theirs).max())
    print(f'max |logits ours - transformers| {diff:.3g} (scale {np.abs(theirs).max():.3g})')
    assert diff <= LOGIT_TOL


EDGE_CASES = [
    '', ' ', '   ', '\n', '\n\n\n', '\t \t', 'a  b   c    d', 'trailing spaces   ',
    "I'm, you're, they've, she'll, he'd, it's, 'tis, DON'T", '0 1 12 123 1234 12345 3.14159',
    'naïve café résumé', '北京欢迎你', 'Здравствуй, мир', '👩‍👩‍👧 emoji 🎉', '\r\n crlf \r\n',
    '\u00a0nbsp\u00a0', 'a<|endoftext|>b', '<|endoftext|>', ' <|endoftext|> twice<|endoftext|>',
]


def test_transformers_tokenizer_gives_our_ids(trained, hf_dir):
    """Every corpus and each edge case. transformers reads `<|endoftext|>` in text as the special
    token, which our encoder does when allowed (encode.py and train.py allow it); with
    split_special_tokens it is text, as our encoder keeps it by default.

    Catches: merges.txt without its '#version' header (the first merge is lost: 'Ġ t' ->
    different ids), vocab.json from another vocabulary, a wrong eos token."""
    _, transformers = _transformers()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert (tok.eos_token, tok.bos_token, tok.model_max_length) == (
        encoder_lib.EOT, encoder_lib.EOT, HP.n_ctx)
    # transformers 5 would find the same without these; transformers 4 reads them.
    config = json.load(open(os.path.join(hf_dir, 'tokenizer_config.json')))
    assert [config[k] for k in ('bos_token', 'eos_token', 'unk_token')] == [encoder_lib.EOT] * 3
    # merges.txt keeps vocab.bpe's '#version' line: transformers 4 skips the first line unread.
    for theirs, ours in zip(('vocab.json', 'merges.txt'), encoder_lib.vocab_files(trained[0])):
        with open(os.path.join(hf_dir, theirs), 'rb') as a, open(ours, 'rb') as b:
            assert a.read() == b.read(), theirs
    enc = encoder_lib.get_encoder(trained[0])
    texts = [open(p, encoding='utf-8').read() for p in corpus_files()] + EDGE_CASES
    tokens = 0
    for text in texts:
        ids = enc.encode(text)
        if encoder_lib.EOT in text:
            assert tok(text, split_special_tokens=True)['input_ids'] == ids, text
            ids = enc.encode(text, allowed_special='all')
        assert tok(text)['input_ids'] == ids, text[:40]
        tokens += len(ids)
    print(f'{len(texts)} texts, {tokens} tokens: every id the same')


def test_round_trip_changes_no_byte(trained, hf_dir, tmp_path):
    """ours -> Hugging Face -> ours: every tensor byte for byte, hparams.json and the vocabulary
    files the same."""
    run_dir, prefix = trained
    out = str(tmp_path / 'back')
    assert convert.from_hf(hf_dir, out) == []
    before, after = _flat(prefix), _flat(os.path.join(out, convert.CKPT_NAME))
    names = set(checkpoint.shapes(HP))
    assert set(after) == names and names <= set(before)  # (the run's also holds training state)
    for k in names:
        assert after[k].dtype == np.float32 and after[k].tobytes() == before[k].tobytes(), k
    for name, source in [(hparams_lib.FILENAME, run_dir), ('encoder.json', run_dir),
                         ('vocab.bpe', run_dir)]:
        with open(os.path.join(out, name), 'rb') as a, open(os.path.join(source, name), 'rb') as b:
            assert a.read() == b.read(), name
    assert checkpoint.resolve(out) == os.path.join(out, convert.CKPT_NAME)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_is_rounded_as_torch_rounds_and_widens_back_exactly(trained, tmp_path,
                                                                           dtype):
    """to_hf --dtype: transformers loads the narrow weights as torch's own rounding of ours
    (round to nearest even); from_hf widens them back to float32 without a further change."""
    torch, transformers = _transformers()
    half = str(tmp_path / dtype)
    convert.to_hf(trained[1], half, dtype=dtype)
    assert json.load(open(os.path.join(half, 'config.json')))['dtype'] == dtype
    hf = transformers.GPT2LMHeadModel.from_pretrained(half)
    state = hf.state_dict()
    want_dtype = getattr(torch, dtype)
    params = checkpoint.flatten(checkpoint.load_params(trained[1])[0])
    for name, value in params.items():
        theirs = state['transformer.' + convert.hf_name(name)]
        rounded = torch.tensor(value[0] if value.ndim == 3 else value).to(want_dtype)
        assert theirs.dtype == want_dtype and torch.equal(theirs, rounded), name
    back = str(tmp_path / 'back')
    convert.from_hf(half, back)
    for name, value in _flat(os.path.join(back, convert.CKPT_NAME)).items():
        rounded = torch.tensor(params[name]).to(want_dtype).float().numpy()
        assert value.dtype == np.float32 and np.array_equal(value, rounded), name


# ---------------------------------------------------------------- transformers -> ours

@pytest.mark.slow
def test_a_transformers_model_samples_greedily_as_its_generate(hf_random, tmp_path):
    """`convert.py from_hf` on a folder transformers saved, then `sample.py --temperature 0`
    continues a prompt with exactly the tokens of transformers' greedy generate."""
    torch, _ = _transformers()
    folder, hf, tok = hf_random
    out = tmp_path / 'model'
    code, _, err = _script('convert.py', 'from_hf', folder, out)
    assert code == 0 and err == '', err
    prompt, length = 'The night was dark and the sea', 20
    enc = encoder_lib.get_encoder(str(out))
    ids = enc.encode(prompt)
    # The vocabulary from the folder's tokenizer.json: a real text, whose rarer words need every
    # merge (the prompt's are whole tokens), gets transformers' ids.
    text = real_text(20000)
    assert tok(prompt)['input_ids'] == ids and tok(text)['input_ids'] == enc.encode(text)
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=length, do_sample=False,
                          eos_token_id=None, pad_token_id=encoder_lib.EOT_ID)
    want = enc.decode(gen[0, len(ids):].tolist())
    code, stdout, err = _script('sample.py', '--checkpoint', out, '--prompt', prompt,
                                '--length', length, '--temperature', 0, '--quiet', '--noxla')
    assert code == 0, err
    print(f'greedy continuation: {want!r}')
    assert stdout[:-1] == want  # (print's newline)


def test_shards_and_names_without_the_transformer_prefix(hf_random, tmp_path):
    """A folder sharded by save_pretrained(max_shard_size=...), and a GPT2Model's (names without
    `transformer.`, saved by transformers too) with the causal-mask buffers older transformers
    saved beside the weights: each gives transformers' own tensors, the Conv1D matrices with an
    axis of 1 put in front (never transposed)."""
    torch, transformers = _transformers()
    import safetensors.numpy
    folder, hf, _ = hf_random
    sharded, bare = str(tmp_path / 'sharded'), str(tmp_path / 'bare')
    hf.save_pretrained(sharded, max_shard_size='1MB')
    assert os.path.isfile(os.path.join(sharded, convert.INDEX))
    assert len([f for f in os.listdir(sharded) if f.endswith('.safetensors')]) > 2
    transformers.GPT2Model.from_pretrained(folder).save_pretrained(bare)
    weights = safetensors.numpy.load_file(os.path.join(bare, convert.WEIGHTS))
    assert 'wte.weight' in weights and not any(k.startswith('transformer.') for k in weights)
    mask = np.tril(np.ones((HP.n_ctx, HP.n_ctx), np.uint8))[None, None]
    weights.update({'h.0.attn.bias': mask, 'h.0.attn.masked_bias': np.float32([-1e4])})
    safetensors.numpy.save_file(weights, os.path.join(bare, convert.WEIGHTS), {'format': 'pt'})
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    vocab, _ = encoder_lib.vocab_files()
    for source in (sharded, bare):
        out = str(tmp_path / ('out-' + os.path.basename(source)))
        notes = convert.from_hf(source, out)
        # No tokenizer saved beside these weights: GPT-2's own vocabulary, said in a note.
        assert len(notes) == 1 and 'has no tokenizer' in notes[0]
        with open(vocab, 'rb') as a, open(os.path.join(out, 'encoder.json'), 'rb') as b:
            assert a.read() == b.read()
        params, hp, _ = checkpoint.load_params(out)
        assert hp.n_layer == 6 and hp == hparams_lib.load(out)
        for name, value in checkpoint.flatten(params).items():
            want = state['transformer.' + convert.hf_name(name)]
            assert np.array_equal(value, want[None] if value.ndim == 3 else want), name


def test_an_output_layer_of_its_own_is_refused(hf_random, tmp_path):
    """lm_head.weight in the file is accepted when it is wte (tied), refused when it differs:
    this checkpoint format has no place for it, and dropping it would change the model."""
    import safetensors.numpy
    weights = safetensors.numpy.load_file(os.path.join(hf_random[0], convert.WEIGHTS))
    config = _config(hf_random)
    for name, head in [('tied', weights['transformer.wte.weight']),
                       ('untied', weights['transformer.wte.weight'] * 2)]:
        folder = str(tmp_path / name)
        _copy_weights(hf_random, folder, config)
        safetensors.numpy.save_file(dict(weights, **{'lm_head.weight': head}),
                                    os.path.join(folder, convert.WEIGHTS), {'format': 'pt'})
        if name == 'tied':
            convert.from_hf(folder, folder + '-out')
            continue
        with pytest.raises(UserError, match='lm_head.weight differs from wte.weight'):
            convert.from_hf(folder, folder + '-out')
        assert not os.path.exists(folder + '-out')


def test_force_writes_beside_what_is_there_and_removes_nothing(hf_random, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    with pytest.raises(UserError, match='not empty'):
        convert.from_hf(hf_random[0], str(out))
    assert os.listdir(out) == ['notes.txt']
    convert.from_hf(hf_random[0], str(out), force=True)
    assert (out / 'notes.txt').read_text() == 'mine'
    assert checkpoint.load_params(str(out))[1].n_layer == 6
    assert not [f for f in os.listdir(out) if f.startswith('.')]  # no temporary file is left


# ---------------------------------------------------------------- bad input: one line, exit 1

def _copy_weights(hf_random, folder, config=None):
    os.makedirs(folder)
    shutil.copy(os.path.join(hf_random[0], convert.WEIGHTS), folder)
    if config is not None:
        with open(os.path.join(folder, 'config.json'), 'w') as f:
            f.write(config if isinstance(config, str) else json.dumps(config))


def _config(hf_random, **changes):
    return dict(json.load(open(os.path.join(hf_random[0], 'config.json'))), **changes)


def _bad_tensors(hf_random, folder):
    import safetensors.numpy
    _copy_weights(hf_random, folder, _config(hf_random))
    path = os.path.join(folder, convert.WEIGHTS)
    weights = safetensors.numpy.load_file(path)
    del weights['transformer.h.1.mlp.c_fc.bias'], weights['transformer.h.5.ln_2.weight']
    weights['transformer.wpe.weight'] = weights['transformer.wpe.weight'][:32]
    weights['transformer.h.0.mlp.c_fc.weight'] = weights['transformer.h.0.mlp.c_fc.weight'].T.copy()
    safetensors.numpy.save_file(weights, path, {'format': 'pt'})


def _only(name):
    def make(hf_random, folder):
        _copy_weights(hf_random, folder, _config(hf_random))
        os.remove(os.path.join(folder, convert.WEIGHTS))
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(b'\x80\x02 never read')  # whatever it holds: it is not opened
    return make


def _tokenizer(hf_random, folder, config=None, **changes):
    _copy_weights(hf_random, folder, config or _config(hf_random))
    tokenizer = json.load(open(os.path.join(hf_random[0], convert.TOKENIZER)))
    tokenizer['model'].update(changes)
    with open(os.path.join(folder, convert.TOKENIZER), 'w') as f:
        json.dump(tokenizer, f)


def _garbage(hf_random, folder):
    _copy_weights(hf_random, folder, _config(hf_random))
    with open(os.path.join(folder, convert.WEIGHTS), 'r+b') as f:
        f.write(b'\xff' * 16)


FROM_HF_CASES = {
    'no config.json': (lambda h, d: _copy_weights(h, d), ['no config.json in']),
    'malformed config.json': (lambda h, d: _copy_weights(h, d, '{"model_type": "gpt2",'),
                              ['config.json is not valid JSON']),
    'config.json not an object': (lambda h, d: _copy_weights(h, d, '[1, 2]'),
                                  ['expected a JSON object', 'got list']),
    'not GPT-2': (lambda h, d: _copy_weights(h, d, _config(
        h, model_type='llama', architectures=['LlamaForCausalLM'])),
        ['describes LlamaForCausalLM', "model_type 'llama'", 'not GPT-2']),
    'GPT-2 with another head': (lambda h, d: _copy_weights(h, d, _config(
        h, architectures=['GPT2ForSequenceClassification'])),
        ['describes GPT2ForSequenceClassification']),
    'other math': (lambda h, d: _copy_weights(h, d, _config(
        h, activation_function='gelu', layer_norm_epsilon=1e-6)),
        ["activation_function 'gelu'", 'layer_norm_epsilon 1e-06']),
    'tensors missing or of the wrong shape': (_bad_tensors, [
        '2 missing (h.1.mlp.c_fc.bias, h.5.ln_2.weight)',
        'h.0.mlp.c_fc.weight is [256, 64], expected [64, 256]',
        'wpe.weight is [32, 64], expected [64, 64]']),
    'only a pickle': (_only('pytorch_model.bin'), [
        'only as pytorch_model.bin', 'a PyTorch pickle, which can run code',
        '.save_pretrained(', 'safe_serialization=True']),
    'only HDF5': (_only('tf_model.h5'), ['only as tf_model.h5', 'from_tf=True']),
    'not a safetensors file': (_garbage, ['cannot read', 'model.safetensors']),
    'not a byte-level BPE tokenizer': (lambda h, d: _tokenizer(h, d, type='Unigram'), [
        'tokenizer.json is not a byte-level BPE tokenizer', "model 'Unigram'"]),
    'a tokenizer larger than the model': (lambda h, d: _tokenizer(
        h, d, _config(h, vocab_size=50000)), ['ids up to 50256', 'vocab_size 50000']),
}


@pytest.mark.parametrize('case', FROM_HF_CASES)
def test_from_hf_refuses_a_bad_folder_in_one_line(hf_random, tmp_path, case):
    make, fragments = FROM_HF_CASES[case]
    folder, out = str(tmp_path / 'hf'), tmp_path / 'out'
    make(hf_random, folder)
    code, stdout, err = _script('convert.py', 'from_hf', folder, out)
    assert code == 1 and stdout == '', err
    assert err.startswith('convert.py: error: ') and err.count('\n') == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()  # checked whole before anything is written


@pytest.mark.parametrize('command', ['to_hf', 'from_hf'])
def test_a_folder_with_files_is_refused_without_force(trained, hf_random, tmp_path, command):
    source = trained[0] if command == 'to_hf' else hf_random[0]
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    code, _, err = _script('convert.py', command, source, out)
    assert code == 1 and err.count('\n') == 1, err
    assert 'exists and is not empty (1 entries)' in err and '--force' in err
    assert os.listdir(out) == ['keep.txt'] and (out / 'keep.txt').read_text() == 'mine'


def test_to_hf_refuses_an_unknown_dtype(trained, tmp_path):
    code, _, err = _script('convert.py', 'to_hf', trained[0], tmp_path / 'out', '--dtype', 'int8')
    assert code == 1 and err.count('\n') == 1, err
    assert "unknown --dtype 'int8': expected one of float32, float16, bfloat16" in err
    assert not (tmp_path / 'out').exists()
