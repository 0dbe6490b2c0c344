"""gpt2/atlas.py, gpt2/atlas_page.py and sample.py atlas: a tiny run trained here, its page parsed
(html.parser) and checked against the library's own answers, and drawn in headless Chromium."""
import base64
import fcntl
import html.parser
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest

import encoder
import sample as sample_py
from gpt2 import atlas, atlas_page, hparams as hparams_lib, novelty, palimpsest, prompts, runlog
from gpt2 import sampling, settings
from tests import helpers
from tests.conftest import ROOT

# Two lines a one-layer model learns to recite in 80 steps: the early checkpoints babble, the late
# ones copy, so the page has copied and new lines and a memorisation curve that climbs.
CORPUS = 'the cat sat on the mat.\nthe dog lay on the rug.\n' * 60
HP = hparams_lib.HParams(n_vocab=50257, n_ctx=64, n_embd=64, n_head=2, n_layer=1)
STEPS, SAVE_EVERY = (20, 40, 60, 80), 20
TEMPS = (0.5, 1.0, 1.5)
# 4-token n-grams: the corpus's lines are 7 tokens, so the default 8 would find only whole lines.
OPTS = dict(temperatures=TEMPS, prompt='the', nsamples=2, length=32, seed=1, ngram=4, quiet=True)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A run folder with checkpoints at steps 20..80, its log.jsonl and the corpus it recorded."""
    root = tmp_path_factory.mktemp('atlas')
    (root / 'poem.txt').write_text(CORPUS, encoding='utf-8')
    helpers.train(str(root / 'poem.txt'), from_scratch=True, hparams=HP,
                  checkpoint_dir=str(root / 'checkpoint'), run_name='r', steps=STEPS[-1],
                  save_every=SAVE_EVERY, sample_every=0, seq_len=32, batch_size=4,
                  learning_rate=1e-2, val_dataset=str(root / 'poem.txt'), val_every=SAVE_EVERY,
                  val_batch_count=1, progress=False)
    return root


def _atlas(run, **kw):
    """sample.py atlas on the run with OPTS; returns (the Atlas it built, the page's path, every
    compiled decode loop it asked sampling.make_decoder for)."""
    built, decoders = [], {}
    with pytest.MonkeyPatch.context() as mp:
        real = atlas.build
        mp.setattr(atlas, 'build', lambda *a, **k: built.append(real(*a, **k)) or built[-1])
        make = sampling.make_decoder

        def counted(*a, **k):
            d = make(*a, **k)
            decoders[id(d)] = d
            return d
        counted.cache_clear = make.cache_clear
        mp.setattr(sampling, 'make_decoder', counted)
        opts = dict(OPTS, run_name='r', checkpoint_dir=str(run / 'checkpoint'),
                    samples_dir=str(run / 'samples'))
        opts.update(kw)
        sample_py.atlas(**opts)
    path = opts.get('output') or str(run / 'samples' / 'r' / atlas.FILENAME)
    return built[0], path, list(decoders.values())


@pytest.fixture(scope='module')
def page(run):
    """(the Atlas, the page's text, its path, the decode loops used to make it)."""
    sampling.make_decoder.cache_clear()
    built, path, decoders = _atlas(run)
    with open(path, encoding='utf-8') as f:
        return built, f.read(), path, decoders


# ---- reading the page ----

class Node:
    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    def classes(self):
        return (self.attrs.get('class') or '').split()

    def text(self):
        return ''.join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, tag=None, cls=None):
        """Every descendant element with this tag and class, in document order."""
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.classes()):
                    out.append(c)
                out += c.find(tag, cls)
        return out


class _Tree(html.parser.HTMLParser):
    VOID = {'meta', 'col', 'br', 'link', 'img', 'input', 'hr'}

    def __init__(self):
        super().__init__()
        self.root = Node('#document', [])
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs)
        self.open[-1].children.append(node)
        if tag not in self.VOID:
            self.open.append(node)

    def handle_startendtag(self, tag, attrs):
        self.open[-1].children.append(Node(tag, attrs))

    def handle_endtag(self, tag):
        assert self.open[-1].tag == tag, f'</{tag}> closes <{self.open[-1].tag}>'
        self.open.pop()

    def handle_data(self, data):
        self.open[-1].children.append(data)


def parse(text):
    tree = _Tree()
    tree.feed(text)
    tree.close()
    assert tree.open == [tree.root], 'unclosed elements'
    return tree.root


def _unpicture(text):
    # The page draws control characters as their pictures; this is the text they stand for.
    return text.translate({v: k for k, v in atlas_page.CONTROL_PICTURES.items()})


def _cells(doc):
    return {(c.attrs['data-checkpoint'], float(c.attrs['data-temperature'])): c
            for c in doc.find('td', 'cell')}


# ---- the page's contents against the library ----

def test_every_checkpoint_and_temperature_has_its_cell(page):
    """Breaks caught (seen): the last temperature's column left out of each row."""
    built, text, _, _ = page
    doc = parse(text)
    cells = _cells(doc)
    assert sorted(cells) == sorted((f'model-{s}', t) for s in STEPS for t in TEMPS)
    assert len(doc.find('td', 'cell')) == len(cells)   # none twice
    for cell in cells.values():
        assert len(cell.find('div', 'sample')) == OPTS['nsamples']


def test_copied_lines_are_marked_where_the_novelty_filter_says(page, run):
    """Each sample's lines, read back from the page, go through novelty.Filter: the lines it
    calls copied are exactly the marked ones, and each cell's rates and each checkpoint's row of
    the memorisation table are its counts. Breaks caught (seen): flags shifted by one line, the
    marks of a cell's first sample shown on every sample."""
    _, text, _, _ = page
    doc = parse(text)
    filt = novelty.Filter([str(run / 'poem.txt')], mode='mark', ngram=OPTS['ngram'])
    marked = total = 0
    per_checkpoint = {}
    for (ckpt, _), cell in _cells(doc).items():
        report = novelty.Report(OPTS['ngram'])
        for sample in cell.find('div', 'sample'):
            lines = sample.find('div', 'ln')
            want, rep = filt.copied([_unpicture(ln.text()) for ln in lines])
            assert [('copied' in ln.classes()) for ln in lines] == want.tolist()
            report = report + rep
            marked, total = marked + int(want.sum()), total + len(lines)
        rate = cell.find('div', 'rate')[0].text()
        assert rate.startswith(f'copied lines {report.copied_lines}/{report.lines} '), rate
        assert f'{report.ngram}-grams {report.copied_ngrams}/{report.ngrams} ' in rate, rate
        per_checkpoint[ckpt] = per_checkpoint[ckpt] + report if ckpt in per_checkpoint else report
    assert 0 < marked < total, (marked, total)   # both kinds of line, so the check has teeth
    table = doc.find('table', 'rates')[0]
    for row in table.find('tbody')[0].find('tr'):
        ckpt = row.find('th')[0].text()
        lines, grams = [td.text().split(' ')[0] for td in row.find('td')]
        r = per_checkpoint[ckpt]
        assert (lines, grams) == (f'{r.copied_lines}/{r.lines}', f'{r.copied_ngrams}/{r.ngrams}')


def _points(polyline):
    return [tuple(map(float, p.split(','))) for p in polyline.attrs['points'].split()]


def test_the_loss_curve_has_a_point_per_logged_step_and_marks_each_checkpoint(page, run):
    """Breaks caught (seen): every other record dropped, a checkpoint mark at the step after
    its own."""
    _, text, _, _ = page
    svg = parse(text).find('svg')[0]
    logged = runlog.read(str(run / 'checkpoint' / 'r'))
    assert [r['step'] for r in logged] == list(range(1, STEPS[-1] + 1))
    train = _points(svg.find('polyline', 'train')[0])
    val = _points(svg.find('polyline', 'val')[0])
    assert len(train) == len(logged) and len(val) == len(STEPS)
    xs = [x for x, _ in train]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    marks = svg.find('g', 'ckpt')
    assert [int(g.attrs['data-step']) for g in marks] == list(STEPS)
    for g in marks:
        dot = g.find('circle')[0]
        # Each checkpoint's mark sits on the training curve's point of its step.
        assert (float(dot.attrs['cx']), float(dot.attrs['cy'])) == train[
            int(g.attrs['data-step']) - 1]


def test_the_palimpsest_spans_join_to_the_palimpsests_text(page, run):
    """The text of the coloured spans, joined, is what palimpsest.sample writes with the same plan,
    prompts and seed; each span is coloured and named by the checkpoint that wrote it, in walk
    order, and the legend lists them all. Breaks caught (seen): the last span left out, every
    span given the first checkpoint's colour."""
    built, text, _, _ = page
    doc = parse(text)
    prefixes = [str(run / 'checkpoint' / 'r' / f'model-{s}') for s in STEPS]
    store = palimpsest.Store(HP)
    enc = encoder.get_encoder(str(run / 'checkpoint' / 'r'))
    rows, _ = prompts.rows([OPTS['prompt']] * OPTS['nsamples'], enc, HP, 1)
    want = palimpsest.sample(HP, palimpsest.walk_plan(prefixes, built.every), store,
                             settings.SampleSettings(batch_size=len(rows), length=OPTS['length'],
                                                     temperature=TEMPS[0], seed=OPTS['seed']),
                             prompts=rows, decode_text=enc.decode)
    legend = {s.text(): [c for c in s.classes() if c != 'key'][0]
              for s in doc.find('div', 'legend')[0].find('span')}
    assert list(legend) == [f'model-{s}' for s in STEPS]
    texts = doc.find('div', 'palimpsest')
    assert len(texts) == len(want['texts'])
    for div, wanted, stretches in zip(texts, want['texts'], want['stretches']):
        got = div.find('span')
        assert _unpicture(''.join(s.text() for s in got)) == wanted
        names = [s.attrs['data-checkpoint'] for s in got]
        assert names == [os.path.basename(p) for _, _, p in stretches]
        assert [s.classes() for s in got] == [[legend[n]] for n in names]
    assert len(set(legend.values())) == len(STEPS)


def test_one_compiled_decoder_serves_every_cell_and_the_palimpsest(page):
    """12 cells (4 checkpoints x 3 temperatures) and the palimpsest: one decoder built and
    traced once; the checkpoint is an argument and the temperature a tensor. Breaks caught
    (seen): a decoder built afresh for each checkpoint (4 built)."""
    built, _, _, decoders = page
    assert len(decoders) == 1 and decoders[0].tracing_count() == 1
    assert built.traces == {False: 1}


def test_the_page_is_self_contained_and_the_same_seed_gives_the_same_bytes(page, run, tmp_path):
    """Nothing on the page is fetched, and a second run with the same seed writes the same
    bytes. Breaks caught (seen): the time written into the heading."""
    _, text, path, _ = page
    doc = parse(text)
    assert not doc.find('script') and not doc.find('link') and not doc.find('img')
    assert not any('src' in n.attrs for n in doc.find())
    assert all(a.attrs['href'].startswith('#') for a in doc.find('a'))
    for fetches in ('http:', 'https:', 'file:', 'url(', '@import'):
        assert fetches not in text, fetches
    _, again, _ = _atlas(run, output=str(tmp_path / 'again.html'))
    with open(again, 'rb') as f, open(path, 'rb') as g:
        assert f.read() == g.read()


def test_escapes_what_the_samples_and_prompts_say():
    # Sample text is the writer's and the model's: markup in it must stay text.
    evil = 'a <b>&"\'</b>\x0c\x00'
    assert atlas_page.esc(evil) == 'a &lt;b&gt;&amp;&quot;&#x27;&lt;/b&gt;\u240c\u2400'
    assert parse(f'<div title="{atlas_page.esc(evil)}">{atlas_page.esc(evil)}</div>').find(
        'div')[0].text() == 'a <b>&"\'</b>\u240c\u2400'


def test_a_run_without_a_log_gets_the_page_and_a_note(run, tmp_path):
    old = tmp_path / 'checkpoint' / 'old'
    shutil.copytree(run / 'checkpoint' / 'r', old,
                    ignore=lambda d, names: [n for n in names if n == runlog.FILENAME])
    out = tmp_path / 'old.html'
    sample_py.atlas(run_name='old', checkpoint_dir=str(tmp_path / 'checkpoint'), steps='80',
                    temperatures=1.0, prompt='the', nsamples=1, length=8, seed=1,
                    corpus=str(run / 'poem.txt'), output=str(out), quiet=True)
    doc = parse(out.read_text(encoding='utf-8'))
    assert doc.find('p', 'note')[0].attrs['id'] == 'no-log'
    assert 'no loss curve' in doc.find('p', 'note')[0].text()
    assert not doc.find('polyline', 'train')
    assert list(_cells(doc)) == [('model-80', 1.0)]


# ---- sample.py atlas: bad input ----

def test_bad_input_is_one_line_and_exit_1_and_writes_nothing(run, tmp_path):
    (run / 'checkpoint' / 'empty').mkdir(exist_ok=True)
    (tmp_path / 'a-file').write_text('x')
    base = [sys.executable, 'sample.py', 'atlas', '--checkpoint_dir', str(run / 'checkpoint'),
            '--samples_dir', str(tmp_path / 'samples'), '--length', '8', '--quiet']
    cases = [(['--run_name', 'empty'], 'holds no checkpoints'),
             (['--run_name', 'r', '--steps', '20,999'], "no checkpoint '999'"),
             (['--run_name', 'r', '--temperatures=0.7,-0.5'], "entry '-0.5' is not a number >= 0"),
             (['--run_name', 'r', '--output', str(tmp_path / 'a-file' / 'atlas.html')],
              'is a file, not a folder')]
    # Side by side: each is mostly TensorFlow's import.
    procs = [subprocess.Popen(base + argv, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in cases]
    for (argv, want), p in zip(cases, procs):
        out, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (argv, p.returncode, err)
        assert lines[0].startswith('sample.py atlas: error: ') and want in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ['a-file']   # no samples folder, no page


# ---- in a real browser ----

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
VIEWPORT = (1200, 900)


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ending in a NUL byte, commands on the browser's fd 3, replies on fd 4)."""

    def __init__(self, profile):
        to_browser, self.w = os.pipe()
        self.r, from_browser = os.pipe()

        def fds():
            # Copy both ends above 3 and 4 first (close-on-exec), so neither dup2 below clobbers
            # the other end or is a no-op that leaves 3 or 4 close-on-exec.
            a = fcntl.fcntl(to_browser, fcntl.F_DUPFD_CLOEXEC, 10)
            b = fcntl.fcntl(from_browser, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--remote-debugging-pipe',
             '--no-first-run', f'--user-data-dir={profile}',
             f'--window-size={VIEWPORT[0]},{VIEWPORT[1]}', 'about:blank'],
            preexec_fn=fds, close_fds=False,  # close_fds would close 3 and 4 after fds()
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buf, self.events, self.n = b'', [], 0

    def send(self, method, params=None, session=None, timeout=60):
        self.n += 1
        msg = {'id': self.n, 'method': method, 'params': params or {}}
        if session:
            msg['sessionId'] = session
        os.write(self.w, json.dumps(msg).encode() + b'\0')
        reply = self.wait(lambda m: m.get('id') == self.n, timeout)
        assert 'error' not in reply, reply
        return reply['result']

    def wait(self, pred, timeout=60):
        end = time.monotonic() + timeout
        for m in self.events:
            if pred(m):
                return m
        while True:
            while b'\0' in self.buf:
                raw, self.buf = self.buf.split(b'\0', 1)
                self.events.append(json.loads(raw))
                if pred(self.events[-1]):
                    return self.events[-1]
            ready, _, _ = select.select([self.r], [], [], max(0.0, end - time.monotonic()))
            assert ready, 'Chromium did not answer in time'
            chunk = os.read(self.r, 1 << 20)
            assert chunk, f'Chromium closed the pipe (exit {self.proc.poll()})'
            self.buf += chunk

    def close(self):
        try:
            self.send('Browser.close', timeout=10)
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.w)
            os.close(self.r)


def decode_png(data):
    """An 8-bit RGB or RGBA PNG -> uint8 array [height, width, channels] (zlib and NumPy)."""
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack('>I4s', data[pos:pos + 8])
        if kind == b'IHDR':
            w, h, depth, ctype, _, _, interlace = struct.unpack('>IIBBBBB', data[pos + 8:pos + 21])
        elif kind == b'IDAT':
            idat.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    assert depth == 8 and ctype in (2, 6) and not interlace, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b''.join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.int64)
    prior = np.zeros(w * bpp, np.int64)
    for r in range(h):
        kind, line = raw[r, 0], raw[r, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 1:   # Sub: a running sum along the row, per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:   # Up
            cur = (line + prior) % 256
        else:             # Average or Paeth: each byte needs the one before it
            cur, up = line.tolist(), prior.tolist()
            for i in range(len(cur)):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = up[i], up[i - bpp] if i >= bpp else 0
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) % 256
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pick = a if pa <= pb and pa <= pc else b if pb <= pc else c
                    cur[i] = (cur[i] + pick) % 256
            cur = np.array(cur)
        out[r] = prior = cur
    return out.reshape(h, w, bpp).astype(np.uint8)


def test_decode_png_reads_every_filter():
    # A random 16 x 20 RGB image written with each row's filter kind its index mod 5, decoded
    # against the pixels it holds (Paeth's three-way choice needs many pixels to show).
    want = np.random.default_rng(0).integers(0, 256, (20, 16, 3))
    rows, prior = [], np.zeros(48, np.int64)
    for r, row in enumerate(want.reshape(20, 48)):
        a = np.concatenate([[0, 0, 0], row[:-3]])
        c = np.concatenate([[0, 0, 0], prior[:-3]])
        p = a + prior - c
        pa, pb, pc = abs(p - a), abs(p - prior), abs(p - c)
        pred = [np.zeros(48, np.int64), a, prior, (a + prior) // 2,
                np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, prior, c))][r % 5]
        rows.append(bytes([r % 5]) + bytes(((row - pred) % 256).astype(np.uint8)))
        prior = row

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack(
            '>I', zlib.crc32(kind + body))
    png = (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 16, 20, 8, 2, 0, 0, 0)) +
           chunk(b'IDAT', zlib.compress(b''.join(rows))) + chunk(b'IEND', b''))
    assert (decode_png(png) == want).all()


@pytest.mark.skipif(CHROMIUM is None, reason='no chromium on PATH (apt-get install chromium)')
def test_chromium_renders_the_page_with_no_console_error_and_taller_than_a_screen(page, tmp_path):
    """The page loads in headless Chromium with no console message of level error, no uncaught
    exception, no request but the page's own; the full-page screenshot (captureBeyondViewport)
    is the page's layout height, more than the window's, and it is not blank: its pixels vary,
    and more than 2% of them are not the white background. Breaks caught (seen): a
    console.error in the page, an empty body."""
    _, _, path, _ = page
    url = 'file://' + os.path.abspath(path)
    browser = _Chromium(tempfile.mkdtemp(dir=tmp_path))
    try:
        target = browser.send('Target.createTarget', {'url': 'about:blank'})['targetId']
        session = browser.send('Target.attachToTarget', {'targetId': target,
                                                         'flatten': True})['sessionId']
        for domain in ('Page', 'Runtime', 'Log', 'Network'):
            browser.send(f'{domain}.enable', session=session)
        browser.send('Page.navigate', {'url': url}, session=session)
        browser.wait(lambda m: m.get('method') == 'Page.loadEventFired')
        metrics = browser.send('Page.getLayoutMetrics', session=session)
        width = metrics['cssContentSize']['width']
        height = metrics['cssContentSize']['height']
        shot = browser.send('Page.captureScreenshot', {
            'format': 'png', 'captureBeyondViewport': True, 'optimizeForSpeed': True,
            'clip': {'x': 0, 'y': 0, 'width': width, 'height': height, 'scale': 1}},
            session=session)
    finally:
        browser.close()
    events = browser.events
    errors = [e['params'] for e in events if
              (e.get('method') == 'Runtime.consoleAPICalled' and
               e['params']['type'] in ('error', 'assert')) or
              e.get('method') == 'Runtime.exceptionThrown' or
              (e.get('method') == 'Log.entryAdded' and e['params']['entry']['level'] == 'error')]
    assert not errors, errors
    requests = [e['params']['request']['url'] for e in events
                if e.get('method') == 'Network.requestWillBeSent']
    assert requests == [url]
    png = base64.b64decode(shot['data'])
    (tmp_path.parent / 'atlas-render.png').write_bytes(png)   # to look at after a failure
    pixels = decode_png(png)[..., :3]
    viewport = metrics['cssLayoutViewport']['clientHeight']
    print(f'page {os.path.getsize(path)} bytes; render {pixels.shape[1]}x{pixels.shape[0]} '
          f'(window {VIEWPORT[0]}x{VIEWPORT[1]}, viewport height {viewport}); pixel variance '
          f'{pixels.var():.0f}; not white {(pixels < 250).any(-1).mean():.1%}')
    assert pixels.shape[0] == round(height) > VIEWPORT[1] > viewport
    assert pixels.var() > 100
    assert (pixels < 250).any(-1).mean() > 0.02
