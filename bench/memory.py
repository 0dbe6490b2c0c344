"""Peak memory of fine-tuning at 1 x 1024, per model size and option: each row is train.py run
in its own process (2 steps from random weights of that shape, then the save), its peak RSS
read from the kernel (wait4's ru_maxrss), and optionally a resume from that checkpoint (one
step more: the load path).

    flock /tmp/gpt2-bench.lock .venv/bin/python bench/memory.py            # every row
    flock /tmp/gpt2-bench.lock .venv/bin/python bench/memory.py --only 774M,1558M

Prints, per row, the peak RSS in GiB, the wall time, and the train.py command behind it (random
weights stand in for the release: the weights' bytes, not their values, take the memory).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [  # (model, options)
    ('124M', ''),
    ('124M', '--layerwise'),
    ('355M', ''),
    ('355M', '--optimizer adafactor --layerwise'),
    ('774M', '--optimizer adafactor --memory_saving_gradients'),
    ('774M', '--optimizer adafactor --layerwise'),
    ('774M', '--layerwise'),
    ('1558M', '--optimizer adafactor --memory_saving_gradients'),
    ('1558M', '--optimizer adafactor --layerwise'),
    ('1558M', '--optimizer adafactor --layerwise --precision bf16'),
]


def run(cmd, env):
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f'failed: {" ".join(cmd)}\n{out.decode()[-2000:]}')
    return usage.ru_maxrss / 2**20, time.perf_counter() - t0   # Linux: KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--only', help='comma-separated model sizes')
    ap.add_argument('--resume', action='store_true', help='also resume each run for a step')
    args = ap.parse_args()
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(',')]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    work = tempfile.mkdtemp(prefix='gpt2-memory-')
    data = os.path.join(work, 'data.txt')
    with open(data, 'w') as f:   # enough tokens for 1024-token windows; their values do not matter
        f.write(' '.join(f'word{i % 997}' for i in range(20000)))
    print(subprocess.run(['sh', '-c', "lscpu | grep -E 'Model name|^CPU\\(s\\)'"],
                         capture_output=True, text=True).stdout.strip())
    print(f'memory: {os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:.1f} GiB')
    print(f'{"model":6} {"options":55} {"peak RSS":>9} {"time":>7}')
    try:
        for i, (name, options) in enumerate(rows):
            run_dir = os.path.join(work, 'checkpoint')
            shutil.rmtree(run_dir, ignore_errors=True)

            def cmd(steps):
                return [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset', data,
                        '--from_scratch', '--hparams', name, '--steps', str(steps),
                        '--batch_size', '1', *options.split(), '--sample_every', '0',
                        '--noprogress', '--checkpoint_dir', run_dir, '--run_name', f'r{i}']
            rss, secs = run(cmd(2), env)
            print(f'{name:6} {options or "(Adam, defaults)":55} {rss:6.2f} GiB {secs:6.0f}s',
                  flush=True)
            if args.resume:
                rss, secs = run(cmd(3), env)
                print(f'{"":6} {"  resumed for a step":55} {rss:6.2f} GiB {secs:6.0f}s',
                      flush=True)
        print('command: python train.py --dataset DATA --from_scratch --hparams MODEL --steps 2 '
              '--batch_size 1 OPTIONS --sample_every 0 (fine-tuning: --model_name MODEL instead '
              'of --from_scratch --hparams MODEL)')
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
