"""Small PIL-only plots for the alignment world benchmark (no matplotlib dependency)."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (120, 120, 120), (225, 225, 225)
COLORS = {
    "exact": (0, 0, 0),
    "scratch": (31, 119, 180),
    "deradiff": (214, 39, 40),
    "interp": (44, 160, 44),
    "finetuned": (148, 103, 189),
}
ACCENT = (230, 120, 0, 255)
SAMPLER_SHADES = [(214, 39, 40), (255, 127, 14), (140, 86, 75), (227, 119, 194), (188, 189, 34)]


def ascii_text(s: str) -> str:
    """PIL's bundled font has no Greek: spell the symbols out."""
    return s.replace("λ", "lambda").replace("β", "beta").replace("≈", "~")


def font(size=13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def put(draw, x, y, text, f, align="l", fill=BLACK):
    """Text at (x, y), left-aligned, centred ("c") or right-aligned ("r") on x."""
    text = ascii_text(text)
    width = draw.textlength(text, font=f)
    draw.text((x - {"l": 0, "c": width / 2, "r": width}[align], y), text, fill=fill, font=f)


def nice_ticks(lo, hi, n=5):
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * span:
        ticks.append(round(t, 10))
        t += step
    return ticks


class Axes:
    """A data rectangle mapped onto a pixel box of an ImageDraw."""

    def __init__(self, draw, box, xlim, ylim, title="", xlabel="", ylabel=""):
        self.d, self.box, self.xlim, self.ylim = draw, box, xlim, ylim
        x0, y0, x1, y1 = box
        f = font(12)
        draw.rectangle(box, outline=BLACK)
        for t in nice_ticks(*xlim):
            px = self.px(t, ylim[0])[0]
            draw.line([(px, y0), (px, y1)], fill=LIGHT)
            draw.line([(px, y1), (px, y1 + 4)], fill=BLACK)
            put(draw, px, y1 + 6, f"{t:g}", f, "c")
        for t in nice_ticks(*ylim):
            py = self.px(xlim[0], t)[1]
            draw.line([(x0, py), (x1, py)], fill=LIGHT)
            draw.line([(x0 - 4, py), (x0, py)], fill=BLACK)
            put(draw, x0 - 7, py - 7, f"{t:g}", f, "r")
        draw.rectangle(box, outline=BLACK)
        ft = font(14)
        put(draw, (x0 + x1) / 2, y0 - 22, title, ft, "c")
        put(draw, (x0 + x1) / 2, y1 + 24, xlabel, f, "c")
        if ylabel:
            put(draw, x0 - 55, y0 - 22, ylabel, f)

    def px(self, x, y):
        x0, y0, x1, y1 = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def line(self, xs, ys, color, width=2, dash=False):
        pts = [self.px(x, y) for x, y in zip(xs, ys)]
        if dash:
            for i in range(0, len(pts) - 1, 2):
                self.d.line(pts[i:i + 2], fill=color, width=width)
        else:
            self.d.line(pts, fill=color, width=width)

    def markers(self, xs, ys, color, shape="o", r=4):
        for x, y in zip(xs, ys):
            self.marker_at(*self.px(x, y), color, shape, r)

    def marker_at(self, px, py, color, shape="o", r=4):
        if shape == "o":
            self.d.ellipse([px - r, py - r, px + r, py + r], outline=color, width=2)
        elif shape == "s":
            self.d.rectangle([px - r, py - r, px + r, py + r], fill=color)
        elif shape == "^":
            self.d.polygon([(px, py - r - 1), (px - r, py + r), (px + r, py + r)], fill=color)
        else:  # "x"
            self.d.line([(px - r, py - r), (px + r, py + r)], fill=color, width=2)
            self.d.line([(px - r, py + r), (px + r, py - r)], fill=color, width=2)

    def legend(self, entries, corner="tl"):
        """entries: (label, color, shape or None for a line)."""
        f = font(12)
        x0, y0, x1, y1 = self.box
        width = max(self.d.textlength(ascii_text(e[0]), font=f) for e in entries) + 40
        lx = x0 + 8 if corner.endswith("l") else x1 - width - 8
        ly = y0 + 8 if corner.startswith("t") else y1 - 18 * len(entries) - 12
        self.d.rectangle([lx, ly, lx + width, ly + 18 * len(entries) + 6], fill=WHITE, outline=GREY)
        for i, (label, color, shape) in enumerate(entries):
            cy = ly + 12 + 18 * i
            self.d.line([(lx + 6, cy), (lx + 28, cy)], fill=color, width=2)
            if shape:
                self.marker_at(lx + 17, cy, color, shape)
            put(self.d, lx + 34, cy - 7, label, f)


def _range(values, pad=0.08):
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return lo - pad * span, hi + pad * span


def reward_plot(path, lambdas, exact_curve, panels):
    """panels: [(title, [(label, color, shape, ys, dash)])]; exact_curve: (lams, rewards)."""
    w, h = 560, 430
    img = Image.new("RGB", (w * len(panels), h), WHITE)
    d = ImageDraw.Draw(img)
    ys_all = list(exact_curve[1]) + [y for _, series in panels for s in series for y in s[3]]
    ylim = _range(ys_all)
    xlim = (-0.1, max(lambdas) + 0.1)
    for i, (title, series) in enumerate(panels):
        ax = Axes(d, (i * w + 75, 40, i * w + w - 20, h - 50), xlim, ylim, title,
                  "λ  (emulated KL strength β/λ)", "E[r]")
        ax.line(exact_curve[0], exact_curve[1], COLORS["exact"], 2)
        entries = [("exact p_(β/λ)", COLORS["exact"], None)]
        for label, color, shape, ys, dash in series:
            ax.line(lambdas, ys, color, 1, dash=dash)
            ax.markers(lambdas, ys, color, shape)
            entries.append((label, color, shape))
        ax.legend(entries, "tl")
    img.save(path)


def samples_plot(path, col_labels, rows, lim, centers, reward_dir, max_points=1500):
    """rows: [(row label, [points per column as [n, 2] tensors])]; centers: per column [K, 2]."""
    cell, left, top = 128, 170, 34
    img = Image.new("RGB", (left + cell * len(col_labels) + 6, top + cell * len(rows) + 6), WHITE)
    d = ImageDraw.Draw(img, "RGBA")
    f = font(12)
    for j, label in enumerate(col_labels):
        put(d, left + j * cell + cell / 2, 10, label, f, "c")
    for i, (row_label, cols) in enumerate(rows):
        y0 = top + i * cell
        for k, part in enumerate(row_label.split("\n")):
            put(d, 6, y0 + cell / 2 - 14 + 15 * k, part, f)
        for j, pts in enumerate(cols):
            x0 = left + j * cell
            d.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], outline=GREY)

            def px(p):
                return (x0 + (p[0] - lim[0]) / (lim[1] - lim[0]) * (cell - 2),
                        y0 + cell - 2 - (p[1] - lim[0]) / (lim[1] - lim[0]) * (cell - 2))
            if pts is None:
                continue
            step = max(1, pts.shape[0] // max_points)
            color = COLORS["deradiff"] if "DeRaDiff" in row_label else COLORS["scratch"]
            if row_label.startswith("exact"):
                color = COLORS["exact"]
            elif "weight" in row_label:
                color = COLORS["interp"]
            elif "fine-tuned" in row_label:
                color = COLORS["finetuned"]
            for p in pts[::step].tolist():
                qx, qy = px(p)
                d.rectangle([qx, qy, qx + 1, qy + 1], fill=color + (90,))
            for c in centers[j].tolist():  # the target's mode centres
                qx, qy = px(c)
                d.line([(qx - 4, qy), (qx + 4, qy)], fill=ACCENT, width=2)
                d.line([(qx, qy - 4), (qx, qy + 4)], fill=ACCENT, width=2)
            if i == 0 and j == 0:  # the reward direction, from the (empty) centre of the ring
                a = px((0.0, 0.0))
                b = (a[0] + 22 * reward_dir[0], a[1] - 22 * reward_dir[1])
                d.line([a, b], fill=ACCENT, width=2)
                put(d, b[0] + 3, b[1] - 6, "w", f, fill=ACCENT)
    img.save(path)


def mode_plot(path, panels, n_modes):
    """panels: [(title, [(label, color, weights)])]; bars grouped per mode."""
    w, h = 330, 300
    img = Image.new("RGB", (w * len(panels) + 10, h), WHITE)
    d = ImageDraw.Draw(img)
    ymax = max(max(ws) for _, series in panels for _, _, ws in series) * 1.1
    for i, (title, series) in enumerate(panels):
        ax = Axes(d, (i * w + 55, 40, i * w + w - 10, h - 50), (0.5, n_modes + 0.5), (0, ymax), title,
                  "mode (sorted by reward w·m, best first)", "weight")
        bar = 0.8 / len(series)
        for s, (label, color, ws) in enumerate(series):
            for k, v in enumerate(ws):
                xa = k + 1 - 0.4 + s * bar
                p0, p1 = ax.px(xa, 0), ax.px(xa + bar, v)
                d.rectangle([p0[0], p1[1], p1[0] - 1, p0[1]], fill=color)
        if i == 0:
            ax.legend([(label, color, "s") for label, color, _ in series], "tr")
    img.save(path)
