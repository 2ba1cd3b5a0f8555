"""Small PIL drawing: the labelled sweep grid. No ComfyUI imports."""
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
