"""demo.py end to end at a reduced size: every stage runs and its outputs exist and load."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2 import checkpoint
from gpt2 import dataset
from tests.conftest import ROOT


@pytest.mark.slow
def test_demo_runs_every_stage_and_its_outputs_load(tmp_path):
    out = tmp_path / 'demo'
    done = subprocess.run(
        [sys.executable, 'demo.py', '--out', str(out), '--steps', '4', '--save_every', '2',
         '--batch_size', '2', '--seq_len', '16', '--length', '8'],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ('encode', 'train from scratch', 'sample', 'palimpsest', 'novelty', 'atlas'):
        assert f'== {stage}' in done.stdout
    assert 'Done in' in done.stdout
    atlas = out / 'samples' / 'atlas.html'
    assert done.stdout.rstrip().endswith(f'The atlas of the run: {atlas} (open it in a browser)')
    page = atlas.read_text(encoding='utf-8')
    # Both checkpoints at the three default temperatures; the prompt's quotes escaped.
    assert page.count('<td class="cell"') == 6 and 'The &quot;for&quot; statement' in page

    chunks = dataset.load_npz(str(out / 'corpus.npz'))
    assert sum(len(c) for c in chunks) > 50_000 and all(c.max() < 50257 for c in chunks)

    run = out / 'checkpoint' / 'demo'
    prefixes = checkpoint.list_checkpoints(str(run))
    assert [checkpoint.step_of(p) for p in prefixes] == [2, 4]
    params, hp, _ = checkpoint.load_params(prefixes[0])
    assert params['wte'].shape == (hp.n_vocab, hp.n_embd)
    assert not np.array_equal(params['wte'], checkpoint.load_params(prefixes[1])[0]['wte'])

    samples = out / 'samples'
    for name in ('unconditional.txt', 'prompted.txt', 'unconditional.marked.txt'):
        assert (samples / name).read_text(encoding='utf-8').strip(), name
    assert 'The "for" statement' in (samples / 'prompted.txt').read_text(encoding='utf-8')
    spans = glob.glob(str(samples / '**' / '*.json'), recursive=True)
    assert spans, os.listdir(samples)
    assert json.loads(open(spans[0], encoding='utf-8').read())


def test_demo_reads_the_corpus_given_and_stops_with_the_stages_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, 'demo.py', '--out', str(tmp_path / 'demo'), '--corpus',
         str(tmp_path / 'missing.txt')],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f'encode.py {tmp_path / "missing.txt"}' in done.stdout
    assert done.stderr.strip().splitlines() == [
        f'encode.py: error: no such file, folder or glob match: {tmp_path / "missing.txt"}']
    assert '== train' not in done.stdout
    assert not (tmp_path / 'demo' / 'python-docs').exists()
