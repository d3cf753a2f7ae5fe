"""Realistic inputs for the PP-OCR models of the rapidocr wheel (det, rec, cls), rendered with
PIL in the DejaVu fonts, and a CTC greedy decoder for the recogniser.

Preprocessing follows rapidocr 1.4.4 (`ch_ppocr_*` in the wheel): images are BGR; a text line is
resized to height 48 keeping its aspect ratio, scaled by (pixel/255 - 0.5)/0.5 and padded with
zeros on the right to 320 (rec) or 192 (cls) columns; a page is scaled by (pixel/255 - 0.5)/0.5
too (rapidocr's det config: mean and std 0.5, not ImageNet's) at sides that are multiples of 32.
Everything is seeded: the same seed gives the same arrays.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansCondensed.ttf",
)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can has more will would about "
    "invoice total amount date street number order price account page model report table data "
    "line text value paper group network layer channel signal level energy"
).split()
REC_SHAPE = (3, 48, 320)
CLS_SHAPE = (3, 48, 192)
PAGE_SIDE = 640


def fonts_available() -> bool:
    return all(os.path.exists(os.path.join(FONT_DIR, f)) for f in FONTS[:3])


def _fonts() -> list[str]:
    return [os.path.join(FONT_DIR, f) for f in FONTS if os.path.exists(os.path.join(FONT_DIR, f))]


def random_text(rng: np.random.Generator) -> str:
    """A few words and numbers, like a line of a document."""
    parts = []
    for _ in range(rng.integers(2, 5)):
        kind = rng.random()
        if kind < 0.2:
            parts.append(str(rng.integers(0, 10 ** rng.integers(1, 6))))
        elif kind < 0.3:
            parts.append(f"{rng.integers(1, 999)}.{rng.integers(0, 99):02d}")
        else:
            word = str(rng.choice(WORDS))
            parts.append(word.capitalize() if rng.random() < 0.3 else word)
    return " ".join(parts)


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    return paper, ink


def _noisy(image: Image.Image, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """RGB uint8 array with Gaussian pixel noise."""
    array = np.asarray(image, np.float32)
    array = array + rng.normal(0.0, sigma, array.shape)
    return np.clip(array, 0, 255).astype(np.uint8)


def render_line(rng: np.random.Generator, text: str | None = None) -> tuple[np.ndarray, str]:
    """(a cropped text line as an RGB uint8 image, its text)."""
    text = random_text(rng) if text is None else text
    font = ImageFont.truetype(str(rng.choice(_fonts())), int(rng.integers(22, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 10)), int(rng.integers(2, 8))
    size = (right - left + 2 * pad_x, bottom - top + 2 * pad_y)
    paper, ink = _colours(rng)
    image = Image.new("RGB", size, paper)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    return _noisy(image, rng, float(rng.uniform(2, 8))), text


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def normalize_line(rgb: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """rapidocr's resize_norm_img: height to shape[1], width by aspect ratio up to shape[2],
    (x/255 - 0.5)/0.5, zero padding on the right; CHW float32, BGR."""
    _, height, width = shape
    h, w = rgb.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / h)))
    image = Image.fromarray(_bgr(rgb)).resize((resized_w, height), Image.BILINEAR)
    chw = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros(shape, np.float32)
    out[:, :, :resized_w] = (chw - 0.5) / 0.5
    return out


def rec_lines(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`count` text lines for the recogniser: (N x 3 x 48 x 320 float32, texts)."""
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for _ in range(count):
        rgb, text = render_line(rng)
        images.append(normalize_line(rgb, REC_SHAPE))
        texts.append(text)
    return np.stack(images), texts


def cls_lines(count: int, seed: int, rotated: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """`count` text lines for the direction classifier, a share of them upside down:
    (N x 3 x 48 x 192 float32, labels 0 upright / 1 rotated by 180 degrees)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(count):
        rgb, _ = render_line(rng)
        flip = rng.random() < rotated
        if flip:
            rgb = rgb[::-1, ::-1]
        images.append(normalize_line(rgb, CLS_SHAPE))
        labels.append(int(flip))
    return np.stack(images), np.asarray(labels)


def render_page(rng: np.random.Generator, side: int = PAGE_SIDE) -> np.ndarray:
    """An RGB page (side x side) with 3-6 lines of text at various places and sizes."""
    paper, ink = _colours(rng)
    image = Image.new("RGB", (side, side), paper)
    draw = ImageDraw.Draw(image)
    fonts = _fonts()
    lines = int(rng.integers(3, 7))
    slot = side // lines
    for i in range(lines):
        font = ImageFont.truetype(str(rng.choice(fonts)), int(rng.integers(18, 44)))
        text = random_text(rng)
        left, top, right, bottom = font.getbbox(text)
        x = int(rng.integers(10, max(11, side - (right - left) - 10)))
        y = i * slot + int(rng.integers(0, max(1, slot - (bottom - top))))
        draw.text((x - left, y - top), text, font=font, fill=ink)
    return _noisy(image, rng, float(rng.uniform(2, 8)))


def det_pages(count: int, seed: int, side: int = PAGE_SIDE) -> np.ndarray:
    """`count` pages for the detector: N x 3 x side x side float32 (side a multiple of 32)."""
    if side % 32:
        raise ValueError("the detector needs sides that are multiples of 32")
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(count):
        bgr = _bgr(render_page(rng, side)).astype(np.float32) / 255.0
        pages.append(((bgr - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(pages).astype(np.float32)


# ---- the recogniser's output --------------------------------------------------------------------


def characters(model) -> list[str]:
    """The recogniser's classes as rapidocr builds them: blank, the metadata's list, space."""
    meta = {p.key: p.value for p in model.metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: top-1 per position, repeats merged, blanks (class 0) dropped."""
    best = np.asarray(probs).argmax(axis=-1)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]))
    return out


def run(model, array: np.ndarray, batch: int = 32) -> np.ndarray:
    """The model's first output on `array` (onnxruntime CPU, input `x`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    parts = [
        session.run(None, {name: array[i : i + batch]})[0] for i in range(0, len(array), batch)
    ]
    return np.concatenate(parts)


def compare_lines(original, rewritten, lines: np.ndarray, chars: list[str]) -> dict:
    """Per-position top-1 agreement and the share of lines the rewrite decodes as the
    original does, on `lines`."""
    a, b = run(original, lines), run(rewritten, lines)
    same = [x == y for x, y in zip(ctc_decode(a, chars), ctc_decode(b, chars))]
    return {
        "agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "lines_same": float(np.mean(same)),
    }
