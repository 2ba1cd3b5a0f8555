"""Small PIL drawings: the λ-schedule preview and the labelled sweep grid. No ComfyUI imports."""
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


def schedule_preview(curve, steps: int, beta=None, size=(400, 220)) -> Image.Image:
    """λ over the denoising progress (x: 0..100 %), step boundaries marked; β/λ labels if β known."""
    w, h = size
    left, right, top, bottom = 44, 12, 24, 30
    img = Image.new("RGB", size, (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = _font(11)
    hi = max(1.0, max(curve)) * 1.1
    px = lambda p: left + p * (w - left - right)
    py = lambda v: top + (1 - v / hi) * (h - top - bottom)
    draw.rectangle([left, top, w - right, h - bottom], outline=(90, 90, 100))
    for k in range(steps + 1):
        x = px(k / steps)
        draw.line([x, h - bottom, x, h - bottom + (4 if k % 5 else 7)], fill=(120, 120, 130))
    for v in (0.0, 1.0) + ((2.0,) if hi > 2 else ()):
        y = py(v)
        draw.line([left, y, w - right, y], fill=(60, 60, 70))
        draw.text((4, y - 6), _text(font, f"λ={v:g}"), fill=(170, 170, 180), font=font)
    points = [(px(i / (len(curve) - 1)), py(v)) for i, v in enumerate(curve)]
    draw.line(points, fill=(255, 170, 60), width=2)
    draw.text((left, h - bottom + 9), f"0 %   denoising progress ({steps} steps)   100 %", fill=(170, 170, 180), font=font)
    if beta:
        first, last = curve[0], curve[-1]
        fmt = lambda v: "∞" if v == 0 else fmt_number(beta / v)
        draw.text((left, 5), _text(font, f"β = {beta:g}; β/λ: start {fmt(first)}, end {fmt(last)}"),
                  fill=(220, 220, 230), font=font)
    else:
        draw.text((left, 5), _text(font, "λ schedule (connect a pair with β to see β/λ)"), fill=(220, 220, 230), font=font)
    return img


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
