"""The atlas as one self-contained HTML page: inline CSS and SVG charts, no script, nothing
fetched, every text escaped; the same Atlas gives the same bytes (no clock, no randomness)."""
import html
import math
import os

from gpt2 import checkpoint

WIDTH, HEIGHT = 1100, 320            # SVG user units; the charts scale to the page's width
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 28, 44
# Control characters (other than tab and line ends) drawn as their Unicode pictures: raw they are
# HTML parse errors and invisible, and a writer should see that the model wrote one.
CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in '\t\n\r'}
CONTROL_PICTURES[0x7f] = 0x2421

CSS = '''
body{font:15px/1.45 Georgia,'Times New Roman',serif;color:#222;background:#fff;margin:0 auto;
 max-width:1160px;padding:12px 20px 40px}
h1{font-size:25px;margin:8px 0}h2{font-size:19px;margin:34px 0 8px;border-bottom:1px solid #ddd}
nav a{margin-right:14px}.meta{color:#555;font-size:13px}.meta code{font-size:12px}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace}
.note{background:#fff6d5;border-left:4px solid #d9a400;padding:8px 12px}
svg{display:block;width:100%;height:auto;font:12px sans-serif}
svg .axis{stroke:#888;fill:none}svg .tick{stroke:#eee}svg text{fill:#444}
svg .train{stroke:#3b6fb6;fill:none;stroke-width:1.2}svg .val{stroke:#d0542b;fill:none;
 stroke-width:2}svg .val-point{fill:#d0542b}svg .ckpt line{stroke:#999;stroke-dasharray:3 3}
svg .ckpt circle{fill:#fff;stroke:#222;stroke-width:1.5}svg .ckpt.chosen circle{fill:#222}
svg .lines{stroke:#b8332b;fill:none;stroke-width:2}svg .ngrams{stroke:#6a3d9a;fill:none;
 stroke-width:2;stroke-dasharray:6 3}svg .lines-point{fill:#b8332b}svg .ngrams-point{fill:#6a3d9a}
table{border-collapse:collapse}td,th{border:1px solid #ddd;vertical-align:top;padding:6px}
table.grid{width:100%;table-layout:fixed}th{background:#f6f6f6;font:13px sans-serif}
table.rates td{font:13px sans-serif;text-align:right}
.rate{font:12px sans-serif;color:#555;margin-bottom:4px}.who{font:11px sans-serif;color:#888}
.sample,.palimpsest{white-space:pre-wrap;overflow-wrap:anywhere;
 font:13px/1.4 ui-monospace,Menlo,Consolas,monospace}
.sample{border-top:1px dashed #ddd;padding:4px 0}.ln{min-height:1.4em}
.ln.copied,.copied-key{background:#ffdcdc;box-shadow:inset 3px 0 #c22}
.palimpsest{border:1px solid #ddd;padding:8px;margin:8px 0}
span.key{display:inline-block;padding:1px 8px;margin:2px 6px 2px 0;
 font:13px sans-serif;border-radius:3px}
.prompt{background:#f6f6f6;padding:4px 8px;white-space:pre-wrap}
'''


def esc(text):
    """`text` safe inside an element or a quoted attribute: &, <, >, quotes escaped, control
    characters drawn as their pictures."""
    return html.escape(str(text).translate(CONTROL_PICTURES), quote=True)


def name(prefix):
    return os.path.basename(prefix)


def colours(n):
    """(strong, light) colours for n checkpoints: hues a golden angle apart, so neighbours in
    time differ most."""
    out = []
    for i in range(n):
        hue = (i * 137.508) % 360
        out.append((f'hsl({hue:.1f},60%,38%)', f'hsl({hue:.1f},85%,86%)'))
    return out


def _percent(part, whole):
    return f'{part}/{whole} ({100 * part / whole:.1f}%)' if whole else f'{part}/{whole} (n/a)'


def _ticks(lo, hi, n=5, *, whole=False):
    """Round tick values covering [lo, hi], about n of them (whole numbers with `whole`), and
    how many decimals to print."""
    step = (hi - lo) / n if hi > lo else 1.0
    mag = 10 ** math.floor(math.log10(step))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= step * (1 - 1e-9))
    step = max(step, 1) if whole else step
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(count)], max(0, -math.floor(math.log10(step)))


class _Frame:
    """A chart's data ranges mapped onto the SVG's plotting area, with its axes and ticks."""

    def __init__(self, x_range, y_range):
        (self.x0, self.x1), (self.y0, self.y1) = x_range, y_range
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1

    def x(self, v):
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, v):
        return HEIGHT - BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def point(self, x, y):
        return f'{self.x(x):.1f},{self.y(y):.1f}'

    def axes(self, x_label, y_label, *, x_ticks=None, y_suffix=''):
        """Gridlines and labels; x ticks are whole numbers (steps) unless `x_ticks` names
        them [(value, label)]."""
        parts = []
        ys, yd = _ticks(self.y0, self.y1)
        for v in ys:
            y = self.y(v)
            parts.append(f'<line class="tick" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" '
                         f'y2="{y:.1f}"/><text x="{LEFT - 6}" y="{y + 4:.1f}" '
                         f'text-anchor="end">{v:.{yd}f}{y_suffix}</text>')
        if x_ticks is None:
            xs, xd = _ticks(self.x0, self.x1, 8, whole=True)
            x_ticks = [(v, f'{v:.{xd}f}') for v in xs]
        for v, label in x_ticks:
            parts.append(f'<text x="{self.x(v):.1f}" y="{HEIGHT - BOTTOM + 16}" '
                         f'text-anchor="middle">{esc(label)}</text>')
        bottom = HEIGHT - BOTTOM
        parts.append(f'<path class="axis" d="M{LEFT},{TOP} V{bottom} H{WIDTH - RIGHT}"/>'
                     f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.1f}" y="{HEIGHT - 8}" '
                     f'text-anchor="middle">{esc(x_label)}</text>'
                     f'<text x="14" y="{TOP - 10}">{esc(y_label)}</text>')
        return ''.join(parts)


def _svg(label, body):
    # Inline SVG in HTML needs no xmlns, so the page names no address at all.
    return f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(label)}">{body}</svg>'


def _legend_svg(items):
    # (css class of a short line, label), right-aligned along the top
    parts, x = [], WIDTH - RIGHT
    for cls, label in reversed(items):
        x -= 12 + 7 * len(label)
        parts.append(f'<line class="{cls}" x1="{x - 26}" y1="{TOP - 14}" x2="{x - 4}" '
                     f'y2="{TOP - 14}"/><text x="{x}" y="{TOP - 10}">{esc(label)}</text>')
        x -= 30
    return ''.join(parts)


def loss_chart(log, saved, chosen):
    """The training loss at every logged step, the validation loss where it was measured, and a
    mark at each saved checkpoint (filled when it is in the grid), with its loss when logged."""
    losses = [(r['step'], r['loss']) for r in log if 'loss' in r]
    vals = [(r['step'], r['val_loss']) for r in log if 'val_loss' in r]
    marks = [(p, checkpoint.step_of(p)) for p in saved if checkpoint.step_of(p) is not None]
    ys = [v for _, v in losses + vals]
    pad = (max(ys) - min(ys)) * 0.05 if ys else 0
    f = _Frame((0, max([s for s, _ in losses + vals] + [s for _, s in marks] + [1])),
               (min(ys, default=0) - pad, max(ys, default=1) + pad))
    body = [f.axes('step', 'loss (nats per token)')]
    body.append(f'<polyline class="train" points="{" ".join(f.point(s, v) for s, v in losses)}"/>')
    if vals:
        body.append(f'<polyline class="val" points="{" ".join(f.point(s, v) for s, v in vals)}"/>')
        body += [f'<circle class="val-point" cx="{f.x(s):.1f}" cy="{f.y(v):.1f}" r="3">'
                 f'<title>step {s}: validation loss {v:.4f}</title></circle>' for s, v in vals]
    by_step = {r['step']: r for r in log}
    for prefix, step in marks:
        rec = by_step.get(step, {})
        tip = name(prefix) + ''.join(f'{sep}{v:.4f}' for sep, v in (
            (': loss ', rec.get('loss')), (', validation ', rec.get('val_loss'))) if v is not None)
        cls = 'ckpt chosen' if prefix in chosen else 'ckpt'
        dot = (f'<circle cx="{f.x(step):.1f}" cy="{f.y(rec["loss"]):.1f}" r="4.5"/>'
               if 'loss' in rec else '')
        body.append(f'<g class="{cls}" data-step="{step}"><title>{esc(tip)}</title>'
                    f'<line x1="{f.x(step):.1f}" y1="{TOP}" x2="{f.x(step):.1f}" '
                    f'y2="{HEIGHT - BOTTOM}"/>{dot}</g>')
    legend = [('train', 'training loss')] + ([('val', 'validation loss')] if vals else [])
    body.append(_legend_svg(legend))
    return _svg('loss over training steps', ''.join(body))


def memorisation_chart(prefixes, reports):
    """Copied-line share and n-gram share per checkpoint, in percent; a checkpoint with nothing
    counted has no point."""
    steps = [checkpoint.step_of(p) for p in prefixes]
    xs = steps if None not in steps else list(range(1, len(prefixes) + 1))
    series = [('lines', 'copied lines', [reports[p].line_share for p in prefixes]),
              ('ngrams', f'{reports[prefixes[0]].ngram}-token n-grams found',
               [reports[p].ngram_share for p in prefixes])]
    top = max([v for _, _, vs in series for v in vs if v is not None] + [0.01]) * 100
    ticks, _ = _ticks(0, top)
    pad = ((max(xs) - min(xs)) or 1) * 0.03   # room for the end points' dots
    f = _Frame((min(xs) - pad, max(xs) + pad), (0, max(ticks[-1], top)))
    body = [f.axes('checkpoint', 'share of the samples found in the corpus', y_suffix='%',
                   x_ticks=[(x, name(p)) for x, p in zip(xs, prefixes)])]
    for cls, label, values in series:
        pts = [(x, v * 100, p) for x, v, p in zip(xs, values, prefixes) if v is not None]
        body.append(f'<polyline class="{cls}" points="'
                    f'{" ".join(f.point(x, v) for x, v, _ in pts)}"/>')
        body += [f'<circle class="{cls}-point" cx="{f.x(x):.1f}" cy="{f.y(v):.1f}" r="3.5">'
                 f'<title>{esc(name(p))}: {esc(label)} {v:.1f}%</title></circle>'
                 for x, v, p in pts]
    body.append(_legend_svg([(cls, label) for cls, label, _ in series]))
    return _svg('memorisation per checkpoint', ''.join(body))


def _lines(text, flags):
    out = []
    for line, copied in zip(text.splitlines(keepends=True), flags):
        attr = ' copied" title="copied from the corpus' if copied else ''
        out.append(f'<div class="ln{attr}">{esc(line.rstrip(chr(13) + chr(10)))}</div>')
    return ''.join(out)


def _who(i, atlas):
    # Rows are prompt by prompt, nsamples each.
    if len(atlas.shown) == 1:
        return ''
    p, k = divmod(i, atlas.nsamples)
    many = len(atlas.shown) > atlas.nsamples
    return f'<div class="who">{f"prompt {p + 1}, " if many else ""}sample {k + 1}</div>'


def grid(atlas, keys):
    """The table: a row per checkpoint, a column per temperature; each cell its samples with the
    copied lines marked, and its copy rates."""
    head = ''.join(f'<th>temperature {t:g}</th>' for t in atlas.temperatures)
    rows = []
    by_prefix = {}
    for c in atlas.cells:
        by_prefix.setdefault(c.prefix, []).append(c)
    for prefix in atlas.prefixes:
        tds = []
        for c in by_prefix[prefix]:
            r = c.report
            rate = (f'copied lines {_percent(r.copied_lines, r.lines)} &middot; '
                    f'{r.ngram}-grams {_percent(r.copied_ngrams, r.ngrams)}')
            samples = ''.join(
                f'<div class="sample" data-sample="{i + 1}">{_who(i, atlas)}'
                f'{_lines(text, flags)}</div>'
                for i, (text, flags) in enumerate(zip(c.texts, c.copied)))
            tds.append(f'<td class="cell" data-checkpoint="{esc(name(prefix))}" '
                       f'data-temperature="{c.temperature:g}"><div class="rate">{rate}</div>'
                       f'{samples}</td>')
        rows.append(f'<tr><th><span class="key {keys[prefix]}">{esc(name(prefix))}</span></th>'
                    f'{"".join(tds)}</tr>')
    return (f'<table class="grid"><colgroup><col style="width:110px"></colgroup>'
            f'<thead><tr><th>checkpoint</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def rates_table(prefixes, reports):
    rows = ''.join(
        f'<tr><th>{esc(name(p))}</th><td>{_percent(reports[p].copied_lines, reports[p].lines)}'
        f'</td><td>{_percent(reports[p].copied_ngrams, reports[p].ngrams)}</td></tr>'
        for p in prefixes)
    n = reports[prefixes[0]].ngram
    return (f'<table class="rates"><thead><tr><th>checkpoint</th><th>copied lines</th>'
            f'<th>{n}-token n-grams found</th></tr></thead><tbody>{rows}</tbody></table>')


def palimpsest_section(atlas, keys):
    legend = ''.join(f'<span class="key {keys[p]}">{esc(name(p))}</span>'
                     for p in atlas.prefixes)
    texts = []
    for i, stretches in enumerate(atlas.layers):
        body = ''.join(f'<span class="{keys[s["checkpoint"]]}" '
                       f'data-checkpoint="{esc(name(s["checkpoint"]))}" '
                       f'title="{esc(name(s["checkpoint"]))}">{esc(s["text"])}</span>'
                       for s in stretches)
        texts.append(f'<div class="palimpsest" data-sample="{i + 1}">{body}</div>')
    return f'<div class="legend">{legend}</div>{"".join(texts)}'


def render(atlas):
    """The page for an Atlas (gpt2/atlas.py), as a str."""
    run = os.path.basename(os.path.normpath(atlas.run_dir))
    keys = {p: f'c{i}' for i, p in enumerate(atlas.prefixes)}
    key_css = ''.join(f'.c{i}{{background:{light}}}span.key.c{i}{{box-shadow:inset 4px 0 '
                      f'{strong}}}' for i, (strong, light) in enumerate(colours(len(keys))))
    reports = atlas.memorisation()
    if atlas.log:
        loss = loss_chart(atlas.log, atlas.saved, set(atlas.prefixes))
    else:
        loss = (f'<p class="note" id="no-log">{esc(atlas.run_dir)} has no '
                'log.jsonl (the run was trained before train.py wrote one, or its log is '
                'empty), so there is no loss curve.</p>')
    if any(atlas.shown):
        prompts = ''.join(f'<div class="prompt">{esc(p)}</div>'
                          for p in atlas.shown[::atlas.nsamples])
    else:
        prompts = '<p class="meta">No prompt: every sample starts from &lt;|endoftext|&gt;.</p>'
    temps = ', '.join(f'{t:g}' for t in atlas.temperatures)
    return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Atlas of {esc(run)}</title>
<style>{CSS}{key_css}</style></head>
<body>
<h1>Atlas of {esc(run)}</h1>
<p class="meta">{len(atlas.prefixes)} of the run's {len(atlas.saved)} checkpoints at temperatures
{temps}; written by <code>{esc(atlas.command)}</code></p>
<nav><a href="#loss">loss</a><a href="#memorisation">memorisation</a><a href="#grid">samples</a>
<a href="#palimpsest">palimpsest</a></nav>
<h2 id="loss">Loss</h2>
{loss}
<h2 id="memorisation">Memorisation</h2>
<p class="meta">The share of the grid's lines copied from the corpus and of its n-grams found
there, per checkpoint (all temperatures together): the checkpoint before the climb is often the
one to sample from.</p>
{memorisation_chart(atlas.prefixes, reports)}
{rates_table(atlas.prefixes, reports)}
<h2 id="grid">Samples</h2>
{prompts}
<p class="meta">The same prompts and seed in every cell. <span class="copied-key">Lines like
this</span> are copied from the corpus.</p>
{grid(atlas, keys)}
<h2 id="palimpsest">Palimpsest</h2>
<p class="meta">One text per sample, each checkpoint writing {atlas.every} tokens in turn at
temperature {atlas.temperatures[0]:g}, on top of what the earlier ones wrote (the keys and values
they left stay in the cache).</p>
{palimpsest_section(atlas, keys)}
</body></html>
'''
