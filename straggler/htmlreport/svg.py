"""A small SVG renderer for the report: histograms, binned heatmaps and line charts as text.

Every chart is drawn from aggregates (bin counts, one cell per node or band of nodes, a few dozen
points), never one element per device, so a fleet of 100,000 devices draws as fast as one of 8.
No JavaScript: hover texts are SVG ``<title>`` elements, which every browser shows natively.
All text is escaped here; callers pass plain strings.
"""

from __future__ import annotations

import math
from html import escape
from typing import Iterable, Sequence

TIER_COLOURS = {"straggler": "#c62828", "undecided": "#ef8f00", "slow": "#d8b100", "healthy": "#7da7d9"}
FONT = 'font-family="system-ui,sans-serif" font-size="11"'


def _f(x: float) -> str:
    return f"{x:.1f}"


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round tick values between lo and hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


class Frame:
    """A plot area with linear (or log2) x and linear y axes in an SVG of ``width`` x ``height``."""

    def __init__(
        self,
        width: int,
        height: int,
        x: tuple[float, float],
        y: tuple[float, float],
        left: int = 48,
        right: int = 12,
        top: int = 12,
        bottom: int = 34,
        xlog: bool = False,
    ):
        self.w, self.h, self.xlog = width, height, xlog
        self.l, self.r, self.t, self.b = left, width - right, top, height - bottom
        self.x0, self.x1 = (math.log2(x[0]), math.log2(x[1])) if xlog else x
        self.y0, self.y1 = y
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1
        self.parts: list[str] = []

    def px(self, x: float) -> float:
        v = math.log2(x) if self.xlog else x
        return self.l + (v - self.x0) / (self.x1 - self.x0) * (self.r - self.l)

    def py(self, y: float) -> float:
        return self.b - (y - self.y0) / (self.y1 - self.y0) * (self.b - self.t)

    def axes(
        self,
        xlabel: str,
        ylabel: str,
        xticks: Iterable[float] | None = None,
        xfmt=_fmt,
        yticks: Iterable[float] | None = None,
        yfmt=_fmt,
    ) -> None:
        p = self.parts
        p.append(f'<line x1="{self.l}" y1="{self.b}" x2="{self.r}" y2="{self.b}" stroke="#444"/>')
        p.append(f'<line x1="{self.l}" y1="{self.t}" x2="{self.l}" y2="{self.b}" stroke="#444"/>')
        lo, hi = (2**self.x0, 2**self.x1) if self.xlog else (self.x0, self.x1)
        ticks = list(xticks) if xticks is not None else _ticks(lo, hi)
        for v in ticks:
            x = self.px(v)
            p.append(
                f'<line x1="{_f(x)}" y1="{self.b}" x2="{_f(x)}" y2="{self.b + 4}" stroke="#444"/>'
                f'<text x="{_f(x)}" y="{self.b + 15}" text-anchor="middle">{escape(xfmt(v))}</text>'
            )
        for v in list(yticks) if yticks is not None else _ticks(self.y0, self.y1, 4):
            y = self.py(v)
            p.append(
                f'<line x1="{self.l - 4}" y1="{_f(y)}" x2="{self.l}" y2="{_f(y)}" stroke="#444"/>'
                f'<text x="{self.l - 6}" y="{_f(y + 4)}" text-anchor="end">{escape(yfmt(v))}</text>'
            )
        p.append(f'<text x="{(self.l + self.r) / 2:.0f}" y="{self.h - 4}" text-anchor="middle">{escape(xlabel)}</text>')
        p.append(
            f'<text x="12" y="{(self.t + self.b) / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 12 {(self.t + self.b) / 2:.0f})">{escape(ylabel)}</text>'
        )

    def vline(self, x: float, label: str, colour: str = "#333", dash: str = "4 3", row: int = 0) -> None:
        if not (self.x0 <= (math.log2(x) if self.xlog else x) <= self.x1):
            return
        px = _f(self.px(x))
        self.parts.append(
            f'<line x1="{px}" y1="{self.t}" x2="{px}" y2="{self.b}" stroke="{colour}" '
            f'stroke-dasharray="{dash}"/><text x="{_f(min(max(float(px), self.l + 30), self.r - 30))}" '
            f'y="{self.t + 9 + 11 * row}" text-anchor="middle" '
            f'fill="{colour}" paint-order="stroke" stroke="#fff" stroke-width="3">{escape(label)}</text>'
        )

    def svg(self, title: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
            f'viewBox="0 0 {self.w} {self.h}" role="img" {FONT}><title>{escape(title)}</title>'
            + "".join(self.parts)
            + "</svg>"
        )


def _count_ticks(top: int) -> list[float]:
    """Ticks of a square-root count axis, as square roots of round counts."""
    return [math.sqrt(v) for v in _ticks(0, top, 4)]


LABEL_ROWS = 4  # rows of flagged-device labels under a histogram
CHAR_PX = 5.2  # width of a character of the 9 px label font, about


def histogram(
    edges: Sequence[float],
    stacks: Sequence[tuple[str, str, Sequence[int]]],
    vlines: Sequence[tuple[float, str, str]],
    markers: Sequence[tuple[float, str, bool]],
    title: str,
    xlabel: str,
    width: int = 720,
    height: int = 270,
) -> str:
    """Stacked bars (``stacks``: (name, colour, count per bin), bottom first) over ``edges``; vertical
    lines (x, label, colour); ``markers`` (x, label, show the label) as triangles under the axis, one
    per flagged device, each with its label as hover text. Labels shown are placed greedily in up to
    LABEL_ROWS rows without overlapping (one that does not fit stays a hover text)."""
    total = [sum(s[2][i] for s in stacks) for i in range(len(edges) - 1)]
    top = max(total, default=0)
    # a square-root count axis: a few stragglers stay visible beside a bin of 10,000 healthy devices
    fr = Frame(
        width, height, (edges[0], edges[-1]), (0, math.sqrt(top) if top else 1), bottom=30 + 12 * (LABEL_ROWS + 1)
    )
    for i in range(len(edges) - 1):
        base = 0
        x0, x1 = fr.px(edges[i]), fr.px(edges[i + 1])
        for name, colour, counts in stacks:
            c = counts[i]
            if not c:
                continue
            y_lo, y_hi = fr.py(math.sqrt(base)), fr.py(math.sqrt(base + c))
            fr.parts.append(
                f'<rect x="{_f(x0)}" y="{_f(y_hi)}" width="{_f(max(x1 - x0 - 0.5, 0.5))}" '
                f'height="{_f(max(y_lo - y_hi, 0.5))}" fill="{colour}"><title>{escape(name)}: {c} '
                f"in {edges[i]:.4f}-{edges[i + 1]:.4f}</title></rect>"
            )
            base += c
    fr.axes("", "devices (sqrt scale)", yticks=_count_ticks(top), yfmt=lambda v: f"{v * v:,.0f}")
    fr.parts.append(f'<text x="{(fr.l + fr.r) / 2:.0f}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>')
    for k, (x, label, colour) in enumerate(vlines):
        fr.vline(x, label, colour, row=k)
    ends = [-1e9] * LABEL_ROWS  # right end of the last label in each row
    for x, label, show in markers:
        px = fr.px(min(max(x, edges[0]), edges[-1]))
        y = fr.b + 24
        fr.parts.append(
            f'<path d="M{_f(px)} {y - 6}l-4 7h8z" fill="{TIER_COLOURS["straggler"]}">'
            f"<title>{escape(label)}</title></path>"
        )
        if not show:
            continue
        half = CHAR_PX * len(label) / 2
        lx = min(max(px, fr.l + half), fr.r - half)
        row = next((k for k in range(LABEL_ROWS) if ends[k] < lx - half - 4), None)
        if row is None:
            continue
        ends[row] = lx + half
        ly = y + 12 + 11 * row
        fr.parts.append(
            f'<line x1="{_f(px)}" y1="{y + 1}" x2="{_f(lx)}" y2="{ly - 8}" stroke="#c9a0a0"/>'
            f'<text x="{_f(lx)}" y="{ly}" text-anchor="middle" font-size="9" '
            f'fill="{TIER_COLOURS["straggler"]}">{escape(label)}</text>'
        )
    return fr.svg(title)


def lines(
    series: Sequence[tuple[str, str, Sequence[float], Sequence[float], bool]],
    title: str,
    xlabel: str,
    ylabel: str,
    vlines: Sequence[tuple[float, str, str]] = (),
    xlog: bool = False,
    hlines: Sequence[tuple[float, str, str]] = (),
    width: int = 420,
    height: int = 200,
    xticks: Sequence[float] | None = None,
    xfmt=_fmt,
) -> str:
    """Line charts (``series``: name, colour, xs, ys, draw points only) with a legend; NaN ys are gaps."""
    xs = [x for s in series for x in s[2]]
    ys = [y for s in series for y in s[3] if math.isfinite(y)] + [h[0] for h in hlines]
    if not xs or not ys:
        return ""
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.02 or 1
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = (x_lo / 2, x_hi * 2) if xlog else (x_lo - 1, x_hi + 1)
    fr = Frame(width, height, (x_lo, x_hi), (lo - pad, hi + pad), xlog=xlog, top=26, bottom=34)
    fr.axes(xlabel, ylabel, xticks, xfmt)
    for y, label, colour in hlines:
        py = _f(fr.py(y))
        fr.parts.append(
            f'<line x1="{fr.l}" y1="{py}" x2="{fr.r}" y2="{py}" stroke="{colour}" stroke-dasharray="4 3"/>'
            f'<text x="{fr.l + 4}" y="{float(py) - 3:.1f}" fill="{colour}">'
            f"{escape(label)}</text>"
        )
    for x, label, colour in vlines:
        fr.vline(x, label, colour)
    for k, (name, colour, sx, sy, points) in enumerate(series):
        pts = [(fr.px(x), fr.py(y), x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        if not points and len(pts) > 1:
            d = "M" + " L".join(f"{_f(a)} {_f(b)}" for a, b, _, _ in pts)
            fr.parts.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        for a, b, x, y in pts:
            fr.parts.append(
                f'<circle cx="{_f(a)}" cy="{_f(b)}" r="{2.6 if points else 2}" fill="{colour}">'
                f"<title>{escape(name)}: {escape(xfmt(x))}, {y:.4g}</title></circle>"
            )
        lx = fr.l + 8 + 150 * k  # the legend above the plot area
        fr.parts.append(
            f'<rect x="{lx}" y="6" width="10" height="4" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="12">{escape(name)}</text>'
        )
    return fr.svg(title)


def ratio_colour(r: float, threshold: float) -> str:
    """A cell colour for a performance ratio: white at 1, red towards 1 - 2T and below, blue above 1."""
    if not math.isfinite(r):
        return "#e6e6e6"
    if r >= 1:
        t = min((r - 1) / (2 * threshold), 1.0)
        return f"rgb({int(255 - 120 * t)},{int(255 - 70 * t)},255)"
    t = min((1 - r) / (2 * threshold), 1.0)
    return f"rgb(255,{int(255 - 215 * t)},{int(255 - 215 * t)})"


def heatmap(rows: Sequence[tuple], columns: Sequence[str], threshold: float, title: str, cell: int = 14) -> str:
    """One row per node (or band of nodes): (label, link or None, ratio per column, hover text per
    column, link or None per column); one column per device index (or band of indices)."""
    left, top = 210, 30
    width = left + cell * len(columns) + 20
    height = top + cell * len(rows) + 40
    p = []
    for j, c in enumerate(columns):
        if len(columns) <= 32 or j % max(1, len(columns) // 16) == 0:
            p.append(
                f'<text x="{left + cell * j + cell / 2:.1f}" y="{top - 6}" text-anchor="middle" '
                f'font-size="9">{escape(c)}</text>'
            )
    for i, (label, link, values, hover, links) in enumerate(rows):
        y = top + cell * i
        text = f'<text x="{left - 6}" y="{y + cell - 3}" text-anchor="end">{escape(label)}</text>'
        p.append(f'<a href="{escape(link)}">{text}</a>' if link else text)
        for j, v in enumerate(values):
            rect = (
                f'<rect x="{left + cell * j}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="{ratio_colour(v, threshold)}"><title>{escape(hover[j])}</title></rect>'
            )
            p.append(f'<a href="{escape(links[j])}">{rect}</a>' if links[j] else rect)
    # legend: the colour scale from 1 - 2T to 1 + 2T
    ly = top + cell * len(rows) + 14
    for k in range(9):
        r = 1 - 2 * threshold + k * threshold / 2
        p.append(f'<rect x="{left + 22 * k}" y="{ly}" width="22" height="10" fill="{ratio_colour(r, threshold)}"/>')
    p.append(
        f'<text x="{left - 6}" y="{ly + 9}" text-anchor="end">ratio {1 - 2 * threshold:.2f}</text>'
        f'<text x="{left + 22 * 9 + 4}" y="{ly + 9}">{1 + 2 * threshold:.2f} (grey: no ratio)</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
        f'{height}" role="img" {FONT}><title>{escape(title)}</title>' + "".join(p) + "</svg>"
    )
