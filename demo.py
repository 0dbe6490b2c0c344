"""The whole journey offline on a CPU: a corpus, encode, train from scratch, sample, palimpsest,
novelty, and the atlas of the run.

Every stage runs the real script in a subprocess and prints its command first, so each one can be
copied and run again by hand.
"""
import os
import shlex
import subprocess
import sys
import time

from gpt2 import cli

OUT = 'demo'
RUN_NAME = 'demo'
PROMPT = 'The "for" statement'


def _python_docs(folder):
    """Write the Python documentation topics that ship with CPython (pydoc_data), one file each:
    a corpus that exists on every machine with Python."""
    from pydoc_data import topics
    os.makedirs(folder, exist_ok=True)
    for name, text in sorted(topics.topics.items()):
        with open(os.path.join(folder, f'{name}.txt'), 'w', encoding='utf-8') as f:
            f.write(text)
    return folder


def _run(stage, args):
    print(f'\n== {stage}\n$ python {" ".join(shlex.quote(str(a)) for a in args)}', flush=True)
    done = subprocess.run([sys.executable] + [str(a) for a in args])
    if done.returncode:
        sys.exit(done.returncode)  # the stage printed its one-line error; the header names it


def main(corpus=None, out=OUT, steps=1200, save_every=300, hparams='tiny', batch_size=8,
         seq_len=128, learning_rate=2e-3, length=80, seed=0):
    """Train a small GPT-2 from scratch on a corpus and sample it at every saved step.

    With no --corpus, the Python documentation that ships inside CPython is the corpus. Outputs:
    OUT/corpus.npz, OUT/checkpoint/demo/model-STEP.* (OpenAI's format), OUT/samples/ (samples
    written during training, unconditional and prompted samples, the palimpsest with its JSON
    of spans, the samples with lines copied from the corpus marked, and atlas.html: the run's
    loss, samples and memorisation at a glance).

    Args:
        corpus: text files, folders or globs to train on (comma-separated); default: Python docs.
        out: the folder for everything the demo writes.
        steps: training steps; checkpoints are saved every --save_every of them.
        save_every: steps between checkpoints (and samples during training).
        hparams: a preset (tiny, small, ...) or an hparams.json for the model trained from scratch.
        batch_size: windows per step.
        seq_len: tokens per window.
        learning_rate: Adam's step size (high: the model is small and starts from scratch).
        length: tokens per sample.
        seed: seeds training and every sample, so a run can be repeated.
    """
    began = time.time()
    os.makedirs(out, exist_ok=True)
    ckpt_dir, samples = os.path.join(out, 'checkpoint'), os.path.join(out, 'samples')
    data = os.path.join(out, 'corpus.npz')
    if corpus is None:
        corpus = _python_docs(os.path.join(out, 'python-docs'))
        print(f'corpus: the Python documentation shipped with Python, written to {corpus}/')
    corpus = [str(c) for c in (corpus if isinstance(corpus, (list, tuple)) else [corpus])]
    common = ['--run_name', RUN_NAME, '--checkpoint_dir', ckpt_dir]

    _run('encode', ['encode.py', *corpus, data])
    _run('train from scratch', [
        'train.py', '--dataset', data, '--from_scratch', '--hparams', hparams, *common,
        '--sample_dir', samples, '--restore_from', 'fresh', '--steps', steps,
        '--save_every', save_every, '--sample_every', save_every, '--sample_length', length,
        '--batch_size', batch_size, '--seq_len', seq_len, '--learning_rate', learning_rate,
        '--lr_schedule', 'cosine', '--warmup_steps', min(50, steps // 10), '--seed', seed])
    uncond = os.path.join(samples, 'unconditional.txt')
    _run('sample', ['sample.py', *common, '--nsamples', 3, '--length', length, '--top_k', 40,
                    '--seed', seed, '--output', uncond])
    _run('sample with a prompt', ['sample.py', *common, '--prompt', PROMPT, '--nsamples', 2,
                                  '--length', length, '--top_k', 40, '--seed', seed,
                                  '--include_prompt', '--output',
                                  os.path.join(samples, 'prompted.txt')])
    _run('palimpsest', ['sample.py', 'palimpsest', *common, '--steps', 'all',
                        '--every', max(length // 4, 1), '--annotate', '--length', length,
                        '--top_k', 40, '--seed', seed, '--samples_dir', samples])
    _run('novelty', ['sample.py', 'novelty', '--corpus', ','.join(corpus), '--samples', uncond,
                     '--mode', 'mark', '--output', os.path.join(samples, 'unconditional.marked.txt')])
    atlas = os.path.join(samples, 'atlas.html')
    _run('atlas', ['sample.py', 'atlas', *common, '--prompt', PROMPT, '--nsamples', 2,
                   '--length', length, '--top_k', 40, '--seed', seed, '--output', atlas])
    print(f'\nDone in {time.time() - began:.0f} s. Checkpoints: {ckpt_dir}/{RUN_NAME}/; '
          f'samples: {samples}/ (training samples in {samples}/{RUN_NAME}/).\n'
          f'The atlas of the run: {atlas} (open it in a browser)')


if __name__ == '__main__':
    cli.main(main, name='demo.py')
