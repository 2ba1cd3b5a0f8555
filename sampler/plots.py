"""Small PIL drawings: the labelled sweep grid and the λ-search plot. No ComfyUI imports."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


_TRUETYPE = ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "LiberationSans-Regular.ttf",
             "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf")
_ASCII = {"λ": "lambda", "β": "beta", "∞": "inf", "→": "->", "–": "-"}


def _font(size=12):
    for name in _TRUETYPE:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _has_glyph(font, char: str) -> bool:
    """False when ``char`` would be drawn as the missing-glyph box."""
    def mask(c):
        m = font.getmask(c)
        return m.size, bytes(m)
    return mask(char) != mask("\ue000")


def _text(font, text: str) -> str:
    """λ, β, ∞ where the font has them, their names where it does not."""
    for char, name in _ASCII.items():
        if char in text and not _has_glyph(font, char):
            text = text.replace(char, name)
    return text


def fmt_number(v: float) -> str:
    """4 significant digits without scientific notation (10000, not 1e+04)."""
    if v == float("inf"):
        return "∞"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


def labelled_grid(images: np.ndarray, labels: list[str], columns: int = 0) -> np.ndarray:
    """images: [N, H, W, C] floats in 0..1 -> one grid image [1, H', W', C] with a label under each."""
    n, h, w, c = images.shape
    columns = columns or (n if n <= 8 else math.ceil(math.sqrt(n)))  # a sweep reads best as one row
    rows = math.ceil(n / columns)
    font = _font(max(10, min(18, w // 14)))
    texts = [_text(font, labels[i]) if i < len(labels) else "" for i in range(n)]
    # a label wider than its tile goes on one line per part ("λ=…", "β/λ=…")
    lines = [t.split("  ") if font.getlength(t) > w - 6 else [t] for t in texts]
    line_h = int(getattr(font, "size", 11) * 1.3)
    strip = line_h * max(len(l) for l in lines) + 6
    grid = Image.new("RGB", (columns * w, rows * (h + strip)), (16, 16, 16))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, col = divmod(i, columns)
        tile = Image.fromarray(np.clip(images[i, ..., :3] * 255.0 + 0.5, 0, 255).astype(np.uint8))
        grid.paste(tile, (col * w, r * (h + strip)))
        for j, line in enumerate(lines[i]):
            draw.text((col * w + 3, r * (h + strip) + h + 3 + j * line_h), line, fill=(235, 235, 235), font=font)
    return np.asarray(grid, dtype=np.float32)[None] / 255.0


def search_plot(lo: float, hi: float, grid, mean, std, points, watch=None, beta=None, best=None,
                reward_name: str = "reward", watch_name: str = "", size=(640, 360)) -> np.ndarray:
    """Reward against λ: the GP mean with a ±2σ band, each evaluated λ (mean ± standard error), an
    optional second metric on its own right-hand axis, the best λ, and β/λ along the top when β is
    known. ``points``/``watch``: [(λ, mean, sem)]. Returns [1, H, W, 3] floats in 0..1."""
    w, h = size
    left, right, top, bottom = 62, 62 if watch else 16, 50, 44
    img = Image.new("RGB", size, (24, 24, 28))
    band_layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw, band = ImageDraw.Draw(img), ImageDraw.Draw(band_layer)
    font = _font(11)
    px = lambda lam: left + (lam - lo) / (hi - lo) * (w - left - right)

    def axis(values):
        v_lo, v_hi = min(values), max(values)
        pad = (v_hi - v_lo) * 0.08 or max(abs(v_hi), 1.0) * 0.05
        v_lo, v_hi = v_lo - pad, v_hi + pad
        return v_lo, v_hi, (lambda v: top + (1 - (v - v_lo) / (v_hi - v_lo)) * (h - top - bottom))

    values = [m - 2 * s for m, s in zip(mean, std)] + [m + 2 * s for m, s in zip(mean, std)]
    values += [m - e for _, m, e in points] + [m + e for _, m, e in points]
    r_lo, r_hi, py = axis(values)
    draw.rectangle([left, top, w - right, h - bottom], outline=(90, 90, 100))
    upper = [(px(x), py(m + 2 * s)) for x, m, s in zip(grid, mean, std)]
    lower = [(px(x), py(m - 2 * s)) for x, m, s in zip(grid, mean, std)][::-1]
    band.polygon(upper + lower, fill=(90, 160, 255, 60))
    img.paste(band_layer, (0, 0), band_layer)
    draw = ImageDraw.Draw(img)
    draw.line([(px(x), py(m)) for x, m in zip(grid, mean)], fill=(90, 160, 255), width=2)
    for lam, m, e in points:
        x, y = px(lam), py(m)
        draw.line([x, py(m - e), x, py(m + e)], fill=(255, 170, 60))
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 170, 60))
    if watch:
        v_lo, v_hi, pw = axis([m - e for _, m, e in watch] + [m + e for _, m, e in watch])
        pts = sorted(watch)
        draw.line([(px(lam), pw(m)) for lam, m, _ in pts], fill=(120, 220, 140), width=1)
        for lam, m, e in pts:
            draw.rectangle([px(lam) - 2, pw(m) - 2, px(lam) + 2, pw(m) + 2], fill=(120, 220, 140))
        for v in (v_lo, (v_lo + v_hi) / 2, v_hi):
            draw.text((w - right + 4, pw(v) - 6), fmt_number(round(v, 4)), fill=(120, 220, 140), font=font)
    for v in (r_lo, (r_lo + r_hi) / 2, r_hi):
        draw.text((4, py(v) - 6), fmt_number(round(v, 4)), fill=(170, 170, 180), font=font)
    legend = f"● {reward_name} (left axis, GP mean ± 2σ)"
    draw.text((left, 4), _text(font, legend), fill=(90, 160, 255), font=font)
    if watch:
        draw.text((left + font.getlength(legend) + 16, 4), _text(font, f"■ {watch_name} (right axis)"),
                  fill=(120, 220, 140), font=font)
    for k in range(6):
        lam = lo + (hi - lo) * k / 5
        x = px(lam)
        draw.line([x, h - bottom, x, h - bottom + 5], fill=(120, 120, 130))
        draw.text((x - 10, h - bottom + 7), _text(font, f"{lam:.3g}"), fill=(170, 170, 180), font=font)
        if beta:
            draw.line([x, top - 5, x, top], fill=(120, 120, 130))
            draw.text((x - 14, top - 20), _text(font, "∞" if lam == 0 else fmt_number(beta / lam)), fill=(170, 170, 180), font=font)
    draw.text((left, h - 16), _text(font, "λ" + ("   (top: emulated β/λ)" if beta else "")), fill=(170, 170, 180), font=font)
    if best is not None:
        x = px(best)
        for y in range(top, h - bottom, 6):
            draw.line([x, y, x, min(y + 3, h - bottom)], fill=(255, 255, 255))
        draw.text((min(x + 4, w - right - 90), top + 4), _text(font, f"best λ = {best:.3g}"), fill=(255, 255, 255), font=font)
    return np.asarray(img, dtype=np.float32)[None] / 255.0
