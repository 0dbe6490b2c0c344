#!/usr/bin/env python3
"""Convert GPT-2 checkpoints to and from Hugging Face `transformers` folders (safetensors only):
python convert.py to_hf CHECKPOINT OUT_DIR, python convert.py from_hf HF_DIR OUT_DIR."""
import sys

from gpt2 import cli, convert


def to_hf(checkpoint, out_dir, dtype='float32', force=False):
    """Write a checkpoint as a folder that transformers loads as it is.

    OUT_DIR gets model.safetensors, config.json (GPT2LMHeadModel), generation_config.json and the
    tokenizer (vocab.json, merges.txt, tokenizer_config.json) from the checkpoint's vocabulary;
    then GPT2LMHeadModel.from_pretrained(OUT_DIR) and AutoTokenizer.from_pretrained(OUT_DIR).

    Args:
        checkpoint: a checkpoint prefix (checkpoint/run1/model-200), a run folder (its latest
            checkpoint) or a model folder (models/124M), as sample.py --checkpoint takes.
        out_dir: the folder to write; it must be new or empty unless --force.
        dtype: the type of the weights in model.safetensors: float32 (as trained, exact),
            float16 or bfloat16 (half the bytes, rounded to nearest); fp32, fp16, bf16 too.
        force: write into an OUT_DIR that has files: those of the same names are replaced, each
            atomically; nothing else there is removed.
    """
    out_dir = str(out_dir)
    prefix = convert.to_hf(str(checkpoint), out_dir, dtype=dtype, force=force)
    print(f'{prefix} -> {out_dir} (transformers: GPT2LMHeadModel.from_pretrained({out_dir!r}))')


def from_hf(hf_dir, out_dir, force=False):
    """Write a Hugging Face GPT-2 folder as an OpenAI-format model folder.

    HF_DIR is what save_pretrained writes for a GPT-2 architecture (GPT2LMHeadModel or GPT2Model:
    distilgpt2, the four GPT-2 sizes, fine-tunes): config.json and model.safetensors, or shards
    with model.safetensors.index.json; float32, float16 or bfloat16. Weights as pickles
    (pytorch_model.bin) or HDF5 (tf_model.h5) are refused: a pickle can run code when loaded.
    OUT_DIR gets model.ckpt.* (float32), `checkpoint`, hparams.json and the folder's own
    vocabulary as encoder.json and vocab.bpe, so that `sample.py --checkpoint OUT_DIR`,
    `train.py --restore_from OUT_DIR` and `train.py --model_name NAME` (for OUT_DIR
    models/NAME) use it.

    Args:
        hf_dir: the Hugging Face model folder.
        out_dir: the folder to write; it must be new or empty unless --force.
        force: write into an OUT_DIR that has files: those of the same names are replaced, each
            atomically; nothing else there is removed.
    """
    for note in convert.from_hf(str(hf_dir), str(out_dir), force=force):
        print(f'note: {note}', file=sys.stderr)
    print(f'{hf_dir} -> {out_dir} (sample.py --checkpoint {out_dir})')


COMMANDS = {'to_hf': to_hf, 'from_hf': from_hf}


if __name__ == '__main__':
    cli.main(COMMANDS, name='convert.py')
