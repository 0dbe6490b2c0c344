"""Choosing the novelty filter's default n-gram length: how much of a text the corpus never saw
is flagged as copied, for each N (false positives: common phrases, not copying).

    flock /tmp/gpt2-bench.lock .venv/bin/python bench/novelty_ngram.py [--ngrams 4,6,8,10,12,16]

Each of ../shared/corpora's texts is checked against an index of the others.
"""
import os
import sys

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt2 import corpus as corpus_lib, novelty  # noqa: E402

SHARED_CORPORA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'shared', 'corpora')


def main(ngrams=(4, 6, 8, 10, 12, 16), probes=('meditations.txt', 'plato.txt')):
    files = corpus_lib.expand_paths(SHARED_CORPORA)
    print(f'{"probe":18} {"N":>3} {"copied lines":>22} {"n-grams found":>22}')
    for probe in probes:
        others = [f for f in files if os.path.basename(f) != probe]
        with open(os.path.join(SHARED_CORPORA, probe), encoding='utf-8') as f:
            text = f.read()
        for n in ngrams:
            _, r = novelty.Filter(others, ngram=n).check(text)
            print(f'{probe:18} {n:3} {r.copied_lines:7} of {r.lines:6} ({100 * r.line_share:4.1f}%)'
                  f' {r.copied_ngrams:7} of {r.ngrams:6} ({100 * r.ngram_share:4.1f}%)')


if __name__ == '__main__':
    fire.Fire(main)
