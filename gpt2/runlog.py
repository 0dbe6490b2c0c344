"""The plain training log beside a run's TensorBoard events: RUN/log.jsonl, one JSON object per
step (step, loss, learning_rate, tokens_per_second, and val_loss when it was measured), appended
a whole line at a time as training goes, cut back to the resumed step on resume."""
import json
import os

from gpt2 import paths

FILENAME = 'log.jsonl'


def path(run_dir):
    return os.path.join(run_dir, FILENAME)


def _parse(line):
    # A record, or None for what a crash can leave: a torn last line (no newline, cut JSON).
    if not line.endswith('\n'):
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(rec, dict) and isinstance(rec.get('step'), int)
    return rec if ok else None


def _lines(run_dir):
    try:
        with open(path(run_dir), encoding='utf-8') as f:
            return f.readlines()
    except FileNotFoundError:
        return None


def read(run_dir):
    """The records of RUN/log.jsonl in step order, one per step (a later line for a step
    replaces an earlier one), or None when the run has no log (trained before train.py wrote
    one). Lines that are not whole records are skipped."""
    lines = _lines(run_dir)
    if lines is None:
        return None
    by_step = {}
    for line in lines:
        rec = _parse(line)
        if rec is not None:
            by_step[rec['step']] = rec
    return [by_step[s] for s in sorted(by_step)]


class Log:
    """RUN/log.jsonl opened for appending after `step`, the step training resumes from.

    Lines past `step` (from a run killed after its last checkpoint, or a history that branched
    from an older checkpoint) and torn lines are dropped first, by rewriting the file atomically,
    so the log always tells the history that led to the weights being trained. Each record is
    one write() of one whole line to a file opened O_APPEND; sync() makes them durable (the loop
    calls it before every checkpoint, so a checkpoint never outlives its log lines).
    """

    def __init__(self, run_dir, step):
        lines = _lines(run_dir) or []
        kept = [line for line in lines if (_parse(line) or {}).get('step', step + 1) <= step]
        if kept != lines:
            paths.write_text(path(run_dir), ''.join(kept))
        self.fd = os.open(path(run_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)

    def write(self, record):
        data = (json.dumps(record, allow_nan=False) + '\n').encode('utf-8')
        while data:
            data = data[os.write(self.fd, data):]

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


class Nowhere:
    """Log's calls, writing nothing: the log of a worker that is not the chief (only the chief
    writes the run folder)."""

    def write(self, record):
        pass

    def sync(self):
        pass

    def close(self):
        pass
