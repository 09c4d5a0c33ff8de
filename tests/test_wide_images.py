"""16- and 32-bit grey images scaled to 8 bits a tile at a time (issue #26): the values are those
of the whole-array float64 formula for every mode, and the conversion's memory is bounded."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from qformer.data import pixels
from qformer.data.pixels import _tiles, _to_8_bit, load_image

SIXTEEN_BIT = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}
# numpy and Python bytes per pixel the conversion may allocate at its peak, on top of Pillow's
# own buffers (which tracemalloc does not see: the source and the 8-bit result at 1 byte per
# pixel). The tiles' float64 copies are a constant, a fraction of a byte per pixel at this size.
TRACED_BYTES_PER_PIXEL = 0.5
LARGE = (3000, 3000)


def whole_array_8_bit(image: Image.Image) -> np.ndarray:
    """The formula as it was, on the whole image in float64 at once: the values to match."""
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and 0 <= low and high <= 65535):
        scaled = values * (255 / 65535)
    elif image.mode == "F" and 0 <= low and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8)


def sixteen_bit(mode: str, values: np.ndarray) -> Image.Image:
    """A ``mode`` image of ``values`` (H, W) in that mode's byte order."""
    height, width = values.shape
    return Image.frombytes(mode, (width, height), values.astype(SIXTEEN_BIT[mode]).tobytes())


@pytest.fixture(params=[pixels.WIDE_TILE_PIXELS, 37], ids=["default-tiles", "small-tiles"])
def tile_pixels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Each test at the module's tile size and at one that cuts rows and leaves ragged edges."""
    monkeypatch.setattr(pixels, "WIDE_TILE_PIXELS", request.param)
    return request.param


@pytest.mark.usefixtures("tile_pixels")
@pytest.mark.parametrize("mode", SIXTEEN_BIT)
def test_every_16_bit_value_rounds_to_the_nearest_of_257(mode: str) -> None:
    values = np.arange(65536, dtype=np.int64).reshape(256, 256)  # every 16-bit value once
    out = np.asarray(_to_8_bit(sixteen_bit(mode, values)))
    # v * 255 / 65535 is v / 257, never halfway (257 is odd): round to nearest is (v + 128) // 257
    assert out.dtype == np.uint8 and np.array_equal(out, (values + 128) // 257)
    assert np.array_equal(out, whole_array_8_bit(sixteen_bit(mode, values)))


def random_wide_images() -> dict[str, np.ndarray]:
    """"I" (int32) and "F" (float32) images (H, W) for each branch of the formula, random values
    with the edges of their range set in the corners."""
    rng = np.random.default_rng(26)
    shape = (61, 53)

    def with_edges(values: np.ndarray, *edges: float) -> np.ndarray:
        flat = values.reshape(-1)
        flat[: len(edges)] = edges
        flat[-len(edges):] = edges[::-1]
        return values

    levels = (np.arange(256) + 0.5) / 255  # the halfway points between 8-bit levels, in 0-1
    info32 = np.iinfo(np.int32)
    f32 = np.finfo(np.float32)
    return {
        "I-16-bit": with_edges(rng.integers(0, 65536, shape, dtype=np.int32), 0, 65535, 128, 129, 32767, 32768),
        "I-full": with_edges(rng.integers(info32.min, info32.max, shape, dtype=np.int32), info32.min, info32.max),
        "I-negative": with_edges(rng.integers(-300, 10, shape, dtype=np.int32), -300, 9),
        "I-over-16-bit": with_edges(rng.integers(0, 70000, shape, dtype=np.int32), 0, 65536),
        "F-unit": with_edges(rng.random(shape, dtype=np.float32), 0.0, 1.0, -0.0, *levels[:5].astype(np.float32),
                             *np.nextafter(levels[:5], 0).astype(np.float32)),
        "F-unit-halfway": with_edges(rng.choice(levels, shape).astype(np.float32), 0.0, 1.0),
        "F-wide": with_edges((rng.standard_normal(shape) * 1e6).astype(np.float32), f32.min, f32.max),
        "F-narrow": with_edges((1000 + rng.random(shape) * 1e-3).astype(np.float32), 1000.0),
        "F-negative": with_edges(-rng.random(shape, dtype=np.float32), -1.0, 0.0),
        "F-just-over-1": with_edges(rng.random(shape, dtype=np.float32), 0.0, float(np.nextafter(np.float32(1), 2))),
        "F-constant": np.full(shape, 0.25, dtype=np.float32),
        "I-constant": np.full(shape, 70000, dtype=np.int32),
        "F-nan": with_edges(rng.random(shape, dtype=np.float32), np.nan),
        "F-one-row": rng.random((1, 500), dtype=np.float32) * 3,  # a row longer than the small tiles
    }


WIDE = random_wide_images()


@pytest.mark.usefixtures("tile_pixels")
@pytest.mark.parametrize("name", WIDE)
def test_32_bit_values_match_the_whole_array_formula(name: str) -> None:
    values = WIDE[name]
    image = Image.fromarray(values)
    assert image.mode == name[0]
    out = _to_8_bit(image)
    assert out.mode == "L" and out.size == image.size
    assert np.array_equal(np.asarray(out), whole_array_8_bit(image))


@pytest.mark.parametrize("size", [(53, 61), (1, 1), (200, 1), (1, 200), (37, 37), (38, 2), (0, 5), (5, 0)])
def test_tiles_cover_the_image_once_within_the_tile_size(size: tuple[int, int], tile_pixels: int) -> None:
    width, height = size
    covered = np.zeros((height, width), dtype=np.int64)
    for left, top, right, bottom in _tiles(width, height):
        assert 0 < (right - left) * (bottom - top) <= tile_pixels
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()


def traced_peak(convert) -> int:
    """The peak bytes numpy and Python allocate while ``convert()`` runs."""
    tracemalloc.start()
    try:
        convert()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mode", ["I;16", "F-unit", "F-wide"])
def test_a_large_wide_image_converts_within_a_bounded_memory(mode: str) -> None:
    width, height = LARGE
    ramp = np.linspace(0, 1, width * height).reshape(height, width)  # (H, W) float64
    if mode == "I;16":
        image = Image.fromarray((ramp * 65535).astype(np.uint16))
    else:
        image = Image.fromarray((ramp if mode == "F-unit" else ramp * 1e5 - 7).astype(np.float32))
    del ramp
    image.load()
    peak = traced_peak(lambda: _to_8_bit(image))
    assert peak / (width * height) <= TRACED_BYTES_PER_PIXEL, f"{peak / 2**20:.1f} MiB traced"


def test_a_large_16_bit_png_loads_within_a_bounded_memory() -> None:
    width, height = LARGE
    buffer = io.BytesIO()
    ramp = np.linspace(0, 65535, width).astype(np.uint16)  # (W,): a small file however large the image
    Image.fromarray(np.broadcast_to(ramp, (height, width)).copy()).save(buffer, "PNG")
    buffer.seek(0)
    with Image.open(buffer) as opened:
        assert opened.mode == "I;16"
    rgb = None

    def load() -> None:
        nonlocal rgb
        rgb = load_image(io.BytesIO(buffer.getvalue()))

    peak = traced_peak(load)
    assert peak / (width * height) <= TRACED_BYTES_PER_PIXEL, f"{peak / 2**20:.1f} MiB traced"
    assert rgb.mode == "RGB" and rgb.size == LARGE
    assert np.array_equal(np.asarray(rgb)[0, :, 0], (ramp.astype(np.int64) + 128) // 257)
