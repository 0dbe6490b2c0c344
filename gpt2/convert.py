"""Hugging Face interop: OpenAI-format checkpoints to and from `transformers` GPT-2 folders
(config.json, safetensors weights, the tokenizer files). Only safetensors are read: a pickle can
run code when it is loaded."""
import json
import os
import re

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

import encoder as encoder_lib
from gpt2 import errors
from gpt2 import hparams as hparams_lib
from gpt2 import paths
from gpt2 import quiet
from gpt2.errors import UserError

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'  # sharded weights: tensor name -> shard file
CKPT_NAME = 'model.ckpt'                # OpenAI's model folders hold model.ckpt.*
VOCAB, MERGES = 'vocab.json', 'merges.txt'  # Hugging Face's names for encoder.json, vocab.bpe
TOKENIZER = 'tokenizer.json'            # what transformers 5 saves instead of those two
# to_hf --dtype (the names transformers gives them; sample.py's short ones are accepted too).
DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': ml_dtypes.bfloat16}
DTYPE_ALIASES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}
# Architectures whose weights are exactly GPT-2's tree (GPT2LMHeadModel's head is tied to wte).
ARCHITECTURES = ('GPT2LMHeadModel', 'GPT2Model')
LAYER_NORM_EPSILON = 1e-5  # gpt2/model.py's norm (OpenAI's value)
# transformers' names for OpenAI's tanh approximation of GELU, the one gpt2/model.py computes.
GELUS = ('gelu_new', 'gelu_pytorch_tanh')
# Training dropout of OpenAI's GPT-2 configs on the Hugging Face Hub; only transformers' own
# training reads it.
DROPOUT = 0.1

_PREFIX = 'transformer.'  # GPT2LMHeadModel's names; a GPT2Model's have none
_HEAD = 'lm_head.weight'  # the output layer, tied to wte: transformers' own saves leave it out
# The causal mask that transformers 4 before 4.3x saved beside the weights: not parameters.
_BUFFER = re.compile(r'h\.\d+\.attn\.(bias|masked_bias)$')
_LEAVES = {'w': 'weight', 'g': 'weight', 'b': 'bias'}
_BLOCK = re.compile(r'h(\d+)$')
_FLOATS = ('F32', 'F16', 'BF16', 'F64')
# Weight files convert.py refuses, by suffix: what they are, and the from_pretrained argument
# that reads them (transformers 4 reads the TensorFlow and Flax ones, 5 no longer does).
_UNSAFE = {
    '.bin': ('a PyTorch pickle, which can run code when it is loaded', ''),
    '.pt': ('a PyTorch pickle, which can run code when it is loaded', ''),
    '.pth': ('a PyTorch pickle, which can run code when it is loaded', ''),
    '.h5': ("Keras' HDF5, which transformers 4 reads with TensorFlow", ', from_tf=True'),
    '.msgpack': ("Flax's msgpack, which transformers 4 reads with Flax", ', from_flax=True'),
}


def hf_name(name):
    """Our checkpoint name -> Hugging Face's within GPT2Model: model/h0/attn/c_attn/w ->
    h.0.attn.c_attn.weight, model/wte -> wte.weight (GPT2LMHeadModel adds `transformer.`)."""
    parts = name.split('/')[1:]
    if len(parts) == 1:
        return parts[0] + '.weight'
    block = _BLOCK.match(parts[0])
    head = [f'h.{block.group(1)}'] if block else [parts[0]]
    return '.'.join(head + parts[1:-1] + [_LEAVES[parts[-1]]])


def hf_shapes(hparams):
    """{Hugging Face name: shape} of every weight a GPT-2 of these hparams has. HF's Conv1D keeps
    OpenAI's [nx, nf] orientation without the leading axis of 1, so no weight is transposed."""
    checkpoint = _checkpoint_lib()
    return {hf_name(k): s[1:] if len(s) == 3 else s for k, s in checkpoint.shapes(hparams).items()}


def check_out_dir(out_dir, force):
    """UserError for an OUT_DIR that is a file, or a folder with something in it (unless
    `force`: then files of the names written are replaced, one by one and atomically, and
    nothing else there is touched)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f'{out_dir} is a file, not a folder: give a folder to write into')
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UserError(f'{out_dir} exists and is not empty ({len(os.listdir(out_dir))} entries):'
                        ' give a new or empty folder, or --force to write into it (files of the '
                        'same names are replaced; nothing else is removed)')


# ---- ours -> Hugging Face ----

def to_hf(path, out_dir, *, dtype='float32', force=False):
    """Write the checkpoint at `path` (a prefix, run folder or model folder, as sample.py
    --checkpoint takes) as a transformers GPT2LMHeadModel folder; returns the checkpoint's
    prefix. Every file is written atomically; config.json, which makes the folder a model to
    transformers, comes last."""
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    errors.check_choice('dtype', dtype, DTYPES)
    path, out_dir = os.fspath(path), os.fspath(out_dir)
    check_out_dir(out_dir, force)
    checkpoint = _checkpoint_lib()
    params, hparams, prefix = checkpoint.load_params(path)
    vocab_path, merges_path = encoder_lib.vocab_files(os.path.dirname(prefix))
    vocab, merges = _read_bytes(vocab_path), _read_bytes(merges_path)
    eot = _read_json(vocab_path).get(encoder_lib.EOT)
    tensors = {}
    for name, value in checkpoint.flatten(params).items():
        if value.ndim == 3:  # conv1d's [1, nx, nf] -> HF Conv1D's [nx, nf]: the same matrix
            assert value.shape[0] == 1, (name, value.shape)
            value = value[0]
        tensors[_PREFIX + hf_name(name)] = np.ascontiguousarray(value, DTYPES[dtype])
    # format 'pt': transformers refuses a safetensors file without it (the layout is PyTorch's).
    paths.write_file(os.path.join(out_dir, WEIGHTS),
                     safetensors.numpy.save(tensors, metadata={'format': 'pt'}))
    paths.write_file(os.path.join(out_dir, VOCAB), vocab)
    paths.write_file(os.path.join(out_dir, MERGES), merges)
    special = {} if eot is None else {
        'bos_token': encoder_lib.EOT, 'eos_token': encoder_lib.EOT, 'unk_token': encoder_lib.EOT}
    _write_json(os.path.join(out_dir, 'tokenizer_config.json'), {
        'tokenizer_class': 'GPT2Tokenizer', 'model_max_length': hparams.n_ctx,
        'add_prefix_space': False, 'errors': 'replace', **special})
    _write_json(os.path.join(out_dir, 'generation_config.json'),
                {'bos_token_id': eot, 'eos_token_id': eot})
    _write_json(os.path.join(out_dir, CONFIG), hf_config(hparams, dtype=dtype, eot=eot))
    return prefix


def hf_config(hparams, *, dtype='float32', eot=encoder_lib.EOT_ID):
    """transformers' GPT2Config, as config.json holds it, for a GPT-2 of these hparams."""
    return {
        'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2',
        'vocab_size': hparams.n_vocab, 'n_positions': hparams.n_ctx, 'n_ctx': hparams.n_ctx,
        'n_embd': hparams.n_embd, 'n_head': hparams.n_head, 'n_layer': hparams.n_layer,
        'n_inner': None, 'activation_function': GELUS[0],
        'layer_norm_epsilon': LAYER_NORM_EPSILON, 'initializer_range': 0.02,
        'resid_pdrop': DROPOUT, 'embd_pdrop': DROPOUT, 'attn_pdrop': DROPOUT,
        'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False,
        'reorder_and_upcast_attn': False, 'tie_word_embeddings': True,
        'bos_token_id': eot, 'eos_token_id': eot, 'use_cache': True,
        # transformers 5 reads `dtype`, 4 `torch_dtype`.
        'dtype': dtype, 'torch_dtype': dtype,
    }


# ---- Hugging Face -> ours ----

def from_hf(hf_dir, out_dir, *, force=False):
    """Write the transformers GPT-2 folder `hf_dir` as an OpenAI-format model folder `out_dir`
    (model.ckpt.*, `checkpoint`, hparams.json, encoder.json, vocab.bpe), the weights in float32;
    returns notes for the person. The folder is checked whole (config, weight files, tokenizer,
    every tensor's name, shape and type) before anything is written."""
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    if not os.path.isdir(hf_dir):
        raise UserError(f'no folder {hf_dir}: expected a Hugging Face model folder (config.json '
                        'and model.safetensors, as save_pretrained writes it)')
    hparams = hparams_of(_read_config(hf_dir), os.path.join(hf_dir, CONFIG))
    files = _weight_files(hf_dir)
    vocab, merges, notes = _vocabulary(hf_dir, hparams)
    check_out_dir(out_dir, force)
    flat = _read_weights(files, hparams, source=hf_dir)
    checkpoint = _checkpoint_lib()
    paths.write_file(os.path.join(out_dir, 'encoder.json'), vocab)
    paths.write_file(os.path.join(out_dir, 'vocab.bpe'), merges)
    hparams_lib.save(hparams, os.path.join(out_dir, hparams_lib.FILENAME))
    checkpoint.save_params(checkpoint.unflatten(flat, hparams), os.path.join(out_dir, CKPT_NAME),
                           hparams=hparams)
    return notes


def hparams_of(config, source):
    """The HParams of a transformers GPT2Config (config.json as a dict); UserError naming the
    architecture when it is not GPT-2, and every setting that would change GPT-2's math."""
    if not isinstance(config, dict):
        raise UserError(f'{source}: expected a JSON object (a transformers config), got '
                        f'{type(config).__name__}')
    kind = config.get('model_type')
    arch = config.get('architectures') or []
    arch = arch if isinstance(arch, list) else [arch]
    if kind != 'gpt2' or any(a not in ARCHITECTURES for a in arch):
        raise UserError(f'{source} describes {", ".join(map(str, arch)) or "a model"} '
                        f'(model_type {kind!r}), not GPT-2: only GPT-2-architecture models '
                        f'(model_type gpt2: {", ".join(ARCHITECTURES)}) convert')
    # transformers' GPT2Config defaults, which apply where config.json says nothing.
    get = config.get
    d = {'n_vocab': get('vocab_size', 50257), 'n_ctx': get('n_positions', get('n_ctx', 1024)),
         'n_embd': get('n_embd', 768), 'n_head': get('n_head', 12), 'n_layer': get('n_layer', 12)}
    problems = []
    if get('activation_function', GELUS[0]) not in GELUS:
        problems.append(f'activation_function {get("activation_function")!r} (GPT-2 uses '
                        f'{GELUS[0]!r}, the tanh approximation)')
    if get('layer_norm_epsilon', LAYER_NORM_EPSILON) != LAYER_NORM_EPSILON:
        problems.append(f'layer_norm_epsilon {get("layer_norm_epsilon")} (GPT-2 uses '
                        f'{LAYER_NORM_EPSILON})')
    if get('n_inner') not in (None, 4 * d['n_embd']):
        problems.append(f'n_inner {get("n_inner")} (GPT-2 uses 4 * n_embd)')
    for key, want in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                      ('add_cross_attention', False)):
        if get(key, want) != want:
            problems.append(f'{key} {get(key)} (GPT-2: {want})')
    if problems:
        raise UserError(f'{source}: settings that change GPT-2\'s math, which this toolkit does '
                        f'not compute: {"; ".join(problems)}')
    return hparams_lib.from_dict(d, source=f'{source} (read as hparams: n_vocab is vocab_size, '
                                 'n_ctx n_positions)')


def _read_config(hf_dir):
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.isfile(path):
        ours = os.path.isfile(os.path.join(hf_dir, hparams_lib.FILENAME))
        raise UserError(f'no {CONFIG} in {hf_dir}: expected a Hugging Face model folder, as '
                        'save_pretrained writes it' + (
                            ' (this one holds an OpenAI-format checkpoint, which needs no '
                            'conversion)' if ours else ''))
    return _read_json(path)


def _read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f'{path} is not valid JSON: {e}') from None


def _weight_files(hf_dir):
    """The safetensors files that hold the weights: model.safetensors, else the shards its index
    names (the order in which transformers looks for them)."""
    single, index = os.path.join(hf_dir, WEIGHTS), os.path.join(hf_dir, INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = _read_json(index)
        weight_map = weight_map.get('weight_map') if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f'{index} has no "weight_map" (tensor name -> shard file)')
        shards = sorted(set(map(str, weight_map.values())))
        missing = [s for s in shards if not os.path.isfile(os.path.join(hf_dir, s))]
        if missing:
            raise UserError(f'{index} names shards that are not in {hf_dir}: '
                            f'{", ".join(missing)}; copy them there')
        return [os.path.join(hf_dir, s) for s in shards]
    unsafe = sorted(f for f in os.listdir(hf_dir) if os.path.splitext(f)[1] in _UNSAFE)
    if unsafe:
        what, option = _UNSAFE[os.path.splitext(unsafe[0])[1]]
        raise UserError(
            f'{hf_dir} holds its weights only as {", ".join(unsafe)} ({what}); convert.py reads '
            f'safetensors only. If you trust where it came from, re-save it as safetensors: '
            f'python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('
            f'{hf_dir!r}{option}).save_pretrained({hf_dir!r}, safe_serialization=True)"')
    raise UserError(f'no {WEIGHTS} or {INDEX} in {hf_dir}: expected the weights as '
                    'save_pretrained writes them')


def _read_weights(files, hparams, *, source):
    """{our checkpoint name: float32 array} from the safetensors files, after checking every
    name, shape and type against the hparams (one UserError listing them all)."""
    found = {}  # HF name within GPT2Model -> (file, name in the file, shape, dtype)
    for path in files:
        try:
            with safetensors.safe_open(path, framework='np') as f:
                for key in f.keys():
                    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
                    if not _BUFFER.match(name):
                        s = f.get_slice(key)
                        found[name] = (path, key, s.get_shape(), s.get_dtype())
        except safetensors.SafetensorError as e:
            raise UserError(f'cannot read {path}: {e} (not a safetensors file, or cut short?)'
                            ) from None
    checkpoint = _checkpoint_lib()
    expected = hf_shapes(hparams)
    if _HEAD in found:
        expected[_HEAD] = expected['wte.weight']
    problems = checkpoint.mismatches(expected, {k: v[2] for k, v in found.items()})
    odd = [f'{k} is {v[3]}' for k, v in sorted(found.items()) if v[3] not in _FLOATS]
    if odd:
        problems += ('; ' if problems else '') + f'{len(odd)} not floats ({", ".join(odd[:4])})'
    if problems:
        raise UserError(f'{source} does not match a GPT-2 of its config.json '
                        f'{hparams.to_dict()}: {problems}')
    arrays = _load_arrays(found)
    if _HEAD in arrays and not np.array_equal(arrays.pop(_HEAD), arrays['wte.weight']):
        raise UserError(f'{source}: {_HEAD} differs from wte.weight, an output layer of its own; '
                        'GPT-2 (and this checkpoint format) ties it to the token embedding')
    flat = {}
    for name, shape in checkpoint.shapes(hparams).items():
        value = arrays[hf_name(name)].astype(np.float32)  # fp16 and bf16 widen exactly
        flat[name] = value[np.newaxis] if len(shape) == 3 else value  # [nx, nf] -> [1, nx, nf]
    return flat


def _load_arrays(found):
    by_file = {}
    for name, (path, key, _, _) in found.items():
        by_file.setdefault(path, []).append((name, key))
    arrays = {}
    for path, names in by_file.items():
        with safetensors.safe_open(path, framework='np') as f:
            for name, key in names:
                arrays[name] = f.get_tensor(key)
    return arrays


def _vocabulary(hf_dir, hparams):
    """(encoder.json bytes, vocab.bpe bytes, notes) of the folder's tokenizer: vocab.json and
    merges.txt as they are, else tokenizer.json's byte-level BPE, else GPT-2's own vocabulary
    (with a note saying so)."""
    vocab_path, merges_path = os.path.join(hf_dir, VOCAB), os.path.join(hf_dir, MERGES)
    tokenizer_path = os.path.join(hf_dir, TOKENIZER)
    notes = []
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        vocab, merges = _read_bytes(vocab_path), _read_bytes(merges_path)
        ids, source = _read_json(vocab_path), vocab_path
    elif os.path.isfile(tokenizer_path):
        ids, lines = _byte_level_bpe(_read_json(tokenizer_path), tokenizer_path)
        vocab = json.dumps(ids, ensure_ascii=False).encode('utf-8')
        merges = ''.join(line + '\n' for line in lines).encode('utf-8')
        source = tokenizer_path
    else:
        vocab_path, merges_path = encoder_lib.vocab_files()
        vocab, merges = _read_bytes(vocab_path), _read_bytes(merges_path)
        ids, source = _read_json(vocab_path), vocab_path
        notes.append(f'{hf_dir} has no tokenizer ({VOCAB} and {MERGES}, or {TOKENIZER}): '
                     "the checkpoint gets GPT-2's own vocabulary")
    if not isinstance(ids, dict) or not all(errors.is_whole(i) for i in ids.values()):
        raise UserError(f'{source}: expected a JSON object of token -> id')
    if ids and max(ids.values()) >= hparams.n_vocab:
        raise UserError(f'{source} has ids up to {max(ids.values())}, past the model\'s '
                        f'vocab_size {hparams.n_vocab}: not this model\'s tokenizer?')
    # encoder/ (like transformers' slow tokenizer) skips the first line of vocab.bpe, the
    # '#version' header that tokenizers' files may lack.
    if not merges.startswith(b'#version'):
        merges = b'#version: 0.2\n' + merges
    return vocab, merges, notes


def _byte_level_bpe(tokenizer, source):
    """(token -> id, merge lines 'a b') of a tokenizer.json that is GPT-2's kind of tokenizer:
    byte-level BPE (what encoder/ computes), else UserError."""
    tokenizer = tokenizer if isinstance(tokenizer, dict) else {}
    model, pre = tokenizer.get('model') or {}, tokenizer.get('pre_tokenizer') or {}
    if not (model.get('type') == 'BPE' and isinstance(model.get('vocab'), dict)
            and pre.get('type') == 'ByteLevel' and not pre.get('add_prefix_space')):
        raise UserError(f'{source} is not a byte-level BPE tokenizer like GPT-2\'s (model '
                        f'{model.get("type")!r}, pre_tokenizer {pre.get("type")!r}): encoder/ '
                        'cannot give its ids')
    ids = dict(model['vocab'])
    for added in tokenizer.get('added_tokens') or []:
        ids.setdefault(added['content'], added['id'])
    # tokenizers writes a merge as 'a b' (before 0.20) or as the pair ['a', 'b'].
    lines = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges') or []]
    return ids, lines


# ---- shared ----

def _read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


def _write_json(path, obj):
    paths.write_file(path, json.dumps(obj, indent=2, ensure_ascii=False) + '\n')


def _checkpoint_lib():
    """gpt2.checkpoint, imported only once a folder passed the checks that need no TensorFlow:
    its import takes seconds (a mistake is told at once instead), with a banner on stderr that
    quiet.import_tensorflow keeps off, as every script does."""
    quiet.import_tensorflow()
    from gpt2 import checkpoint
    return checkpoint
