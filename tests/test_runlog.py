"""gpt2/runlog.py: train.py's log.jsonl, one whole line per step, cut back on resume."""
import json
import os

import numpy as np
import pytest

from gpt2 import runlog
from tests import helpers

TB_TAGS = ('loss', 'learning_rate', 'val_loss')


def _train(tmp_path, tiny, **kw):
    data = str(tmp_path / 'data.npz')
    if not os.path.exists(data):
        os.makedirs(tmp_path, exist_ok=True)
        rng = np.random.default_rng(0)
        np.savez(data, (np.tile(np.arange(17) * 5, 200) + (rng.random(3400) < 0.05)) % 97)
    opts = dict(from_scratch=True, hparams=tiny, checkpoint_dir=str(tmp_path / 'ckpt'),
                run_name='r', sample_every=0, seq_len=16, batch_size=2, learning_rate=3e-3,
                progress=False, jit_compile=False, val_dataset=data, val_every=2,
                val_batch_count=1)
    opts.update(kw)
    return helpers.train(data, **opts)


def _without_rates(records):
    return [{k: v for k, v in r.items() if k != 'tokens_per_second'} for r in records]


def test_a_line_per_step_with_the_tensorboard_values(tmp_path, tiny):
    """Breaks caught (each seen): the val loss written on the step after it was measured, the
    base learning rate logged instead of the scheduled one."""
    out = _train(tmp_path, tiny, steps=5, save_every=2, warmup_steps=4)
    logged = runlog.read(out['run_dir'])
    assert [r['step'] for r in logged] == [1, 2, 3, 4, 5]
    assert [r['loss'] for r in logged] == out['losses']
    assert all(r['tokens_per_second'] > 0 for r in logged)
    board = helpers.scalars(out['run_dir'])
    for tag in TB_TAGS:
        mine = {r['step']: r[tag] for r in logged if tag in r}
        assert mine == pytest.approx(board[tag], rel=1e-6), tag
    assert sorted(board['val_loss']) == [2, 4]


@pytest.mark.slow
def test_resume_drops_the_lines_a_killed_run_wrote_past_its_checkpoint(tmp_path, tiny):
    """A run killed at step 8 after its checkpoint at 6 left lines 7 and 8 and a torn line;
    resuming from model-6 to step 8 leaves the log an uninterrupted run writes (rates aside).
    Breaks caught (each seen): appending without the cut (steps 7, 8 twice), the torn line kept
    (the next record glued to it)."""
    straight = _train(tmp_path / 'a', tiny, steps=8, save_every=3)
    want = _without_rates(runlog.read(straight['run_dir']))
    run = _train(tmp_path / 'b', tiny, steps=6, save_every=3)['run_dir']
    with open(runlog.path(run), 'a', encoding='utf-8') as f:
        f.write('{"step": 7, "loss": 9.0}\n{"step": 8, "loss": 9.0}\n{"step": 9, "lo')
    _train(tmp_path / 'b', tiny, steps=8, save_every=3)
    with open(runlog.path(run), encoding='utf-8') as f:
        lines = f.read().splitlines()
    assert [json.loads(line)['step'] for line in lines] == list(range(1, 9))
    assert _without_rates(runlog.read(run)) == want
    # Branching from an older checkpoint cuts the log back to it.
    _train(tmp_path / 'b', tiny, steps=4, restore_from=os.path.join(run, 'model-3'))
    assert [r['step'] for r in runlog.read(run)] == [1, 2, 3, 4]


def test_read_skips_torn_lines_and_keeps_the_last_line_of_a_step(tmp_path):
    assert runlog.read(str(tmp_path)) is None
    with open(runlog.path(str(tmp_path)), 'w', encoding='utf-8') as f:
        f.write('{"step": 2, "loss": 1.0}\n[1]\n{"step": 1, "loss": 3.0}\n'
                '{"step": 2, "loss": 2.0}\n{"step": 3, "loss"')
    assert runlog.read(str(tmp_path)) == [{'step': 1, 'loss': 3.0}, {'step': 2, 'loss': 2.0}]
