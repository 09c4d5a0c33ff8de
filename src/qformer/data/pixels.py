"""Images decoded and normalised with Pillow and NumPy alone: what evaluation's preprocessing
does before a tensor is made. No torch, so that :mod:`qformer.onnx` runs the exported graphs
where PyTorch is not installed, with the same pixels as :func:`qformer.data.transforms.eval_image`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from qformer.config import ImageConfig
from qformer.data.image_files import MAX_IMAGE_PIXELS

LARGE_IMAGE_PIXELS = 40_000_000  # larger images decode at a reduced scale where the format can (JPEG)
DRAFT_SIDE = 2048  # ... that keeps both sides at least this long: far more than training's 224-364
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16- and 32-bit grey, scaled to 8 bits
WIDE_TILE_PIXELS = 1 << 16  # ... a tile at a time: its float64 copies take 512 KiB each
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = 255  # transparent pixels are composited on white
EXIF_ORIENTATION = 0x0112
AXES_SWAPPED = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter: width and height swap
DecodeReduction = Callable[[int, int], int]  # full upright (width, height) -> the largest shrink factor usable
DRAFTED = "qformer_drafted"  # info key of an image decoded at reduced scale: (full width, full height, scale)


def load_image(
    image: str | Path | BinaryIO | Image.Image, max_pixels: int | None = MAX_IMAGE_PIXELS,
    reduction: DecodeReduction | None = None,
) -> Image.Image:
    """An RGB image from a path, an open binary file or a PIL image, upright as its EXIF
    orientation says, 16- and 32-bit values scaled to 8 bits, transparency composited on
    white. A file whose image (after a JPEG's reduced-scale decoding, for images over
    :data:`LARGE_IMAGE_PIXELS`) has more than ``max_pixels`` pixels (None: no limit but Pillow's
    own) is refused before it is decoded. A file that cannot be read fails naming it (ValueError).

    ``reduction`` (training: :func:`crop_reduction`), given the image's full upright size, says
    by how much the caller can shrink it: a JPEG then decodes at the largest of 1, 1/2, 1/4, 1/8
    scale within that (``Image.draft``, before any pixel is decoded). An image decoded at reduced
    scale carries its full upright size and the scale in ``info[DRAFTED]``. Other formats, and
    no ``reduction`` (evaluation, the CLI), decode at full size."""
    if isinstance(image, Image.Image):
        return _rgb(image)
    name = f"image {image}" if isinstance(image, (str, Path)) else "image"
    try:
        with warnings.catch_warnings():  # the size is checked here, against max_pixels, not PIL's limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(image)
        with opened:
            scale, full = _draft(opened, reduction)
            pixels = opened.width * opened.height
            if max_pixels is not None and pixels > max_pixels:
                raise ValueError(f"{opened.width}x{opened.height} = {pixels:,} pixels is over the limit of "
                                 f"{max_pixels:,} (max_image_pixels): not decoded")
            rgb = _rgb(opened)
            if scale > 1:
                rgb.info[DRAFTED] = (*full, scale)
            return rgb
    except Image.UnidentifiedImageError as err:
        raise ValueError(f"cannot read {name}: not an image file that Pillow can identify") from err
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read {name}: {err}") from err


def _draft(opened: Image.Image, reduction: DecodeReduction | None) -> tuple[int, tuple[int, int]]:
    """Ask a JPEG not yet decoded to decode at 1/scale (a power of 2 up to 8, within what
    ``reduction`` allows and at least what :data:`LARGE_IMAGE_PIXELS` needs); the scale it
    took and its full upright size (1 and the size for other formats, whose EXIF may lie past
    the pixels: not read here)."""
    width, height = opened.size
    if not isinstance(opened, JpegImagePlugin.JpegImageFile):
        return 1, (width, height)
    full = (height, width) if opened.getexif().get(EXIF_ORIENTATION, 1) in AXES_SWAPPED else (width, height)
    wanted = 1 if reduction is None else reduction(*full)
    if width * height > LARGE_IMAGE_PIXELS:
        wanted = max(wanted, min(width, height) // DRAFT_SIDE)
    scale = next(s for s in (8, 4, 2, 1) if s <= max(wanted, 1))
    # asked for (width // scale, height // scale), which fits scale (not 2 x scale) times, draft takes scale
    if scale == 1 or opened.draft("RGB", (width // scale, height // scale)) is None:
        return 1, full
    return scale, full

def _rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (EXIF orientation), in 8-bit RGB, transparent pixels on white."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:
        image = _to_8_bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (BACKGROUND,) * 4), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grey image as 8-bit "L", its value range scaled, not clipped: 16-bit
    modes and "I" images within 0-65535 by 255/65535, "F" images within 0-1 by 255, any other
    "I" or "F" image from its minimum to its maximum.

    The work goes one tile of at most :data:`WIDE_TILE_PIXELS` at a time, straight into the 8-bit
    image, so that it takes that image's byte per pixel and a few float64 copies of one tile:
    the whole image in float64 took 8 bytes per pixel several times over (a 6000x6000 16-bit PNG
    of 70 KB cost 0.9 GB). Each pixel goes through the same float64 operations as it did on the
    whole array, so every value is the same."""
    boxes = list(_tiles(*image.size))
    scaling = _scaling(image, boxes)
    if scaling is None:
        return Image.new("L", image.size, 0)
    offset, factor = scaling
    out = Image.new("L", image.size)
    for box in boxes:
        scaled = np.asarray(image.crop(box), dtype=np.float64)  # (h, w), one tile
        scaled -= offset
        scaled *= factor
        out.paste(Image.fromarray(np.rint(scaled, out=scaled).astype(np.uint8)), box[:2])  # (h, w) uint8
    return out


def _scaling(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]]) -> tuple[float, float] | None:
    """The offset and factor that :func:`_to_8_bit` scales ``image``'s values by, (x - offset) *
    factor, or None where every value goes to 0: one value throughout, or a NaN somewhere (which
    fails every comparison). An offset of 0.0 changes no value (x - 0.0 is x, -0.0 and NaN
    included), so (x - 0.0) * factor is exactly x * factor."""
    if image.mode.startswith("I;16"):
        return 0.0, 255 / 65535
    low, high = _extrema(image, boxes)
    if image.mode == "I" and 0 <= low and high <= 65535:
        return 0.0, 255 / 65535
    if image.mode == "F" and 0 <= low and high <= 1:
        return 0.0, 255.0
    return (low, 255 / (high - low)) if high > low else None


def _tiles(width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) that cover a ``width x height`` image once, each of at
    most :data:`WIDE_TILE_PIXELS` pixels: bands of whole rows, or pieces of one row where a row
    is longer than that (so that no image, however wide, makes a tile larger)."""
    across = max(1, min(width, WIDE_TILE_PIXELS))
    down = max(1, WIDE_TILE_PIXELS // across)
    for top in range(0, height, down):
        for left in range(0, width, across):
            yield left, top, min(left + across, width), min(top + down, height)


def _extrema(image: Image.Image, boxes: Sequence[tuple[int, int, int, int]]) -> tuple[float, float]:
    """The smallest and largest value of an "I" or "F" image, read tile by tile in its own
    32-bit type (exact in float64, as the whole array converted was). Both are NaN if any value
    is, as NumPy's minimum and maximum of the whole array were: Pillow's ``getextrema`` passes
    NaNs over (but a first one), which would scale an image that comes out black."""
    lows, highs = [], []
    for box in boxes:
        values = np.asarray(image.crop(box))  # (h, w) int32 or float32
        lows.append(values.min())
        highs.append(values.max())
    return float(np.min(lows)), float(np.max(highs))


def normalised_pixels(image: Image.Image, config: ImageConfig,
                      box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Bicubic resize (of ``box``, default the whole image) to ``config.size`` square, scale to
    [0, 1], normalise: float32 (3, S, S). Each 8-bit level is normalised once, in a table (the
    same float32 operations as on every pixel, so the same values), and the pixels look it up."""
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    table = (((np.arange(256, dtype=np.float32)[:, None] / 255.0) - mean) / std).T  # (3, 256)
    resized = np.asarray(image.resize((config.size, config.size), Image.Resampling.BICUBIC, box=box))  # (S, S, 3)
    return np.stack([table[c][resized[..., c]] for c in range(3)])  # (3, S, S)
