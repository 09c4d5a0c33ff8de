"""Image files as a user names them on the command line: files, folders and globs, each image
once, in the order given; and batches of them. Standard library only (the CLI imports it)."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

# an image with more pixels is refused before it is decoded (data.max_image_pixels, the CLI):
# 64 MP is 192 MB as RGB, under Pillow's own warning threshold (89.5 MP)
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def expand_images(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """Files as given; a folder's image files (sorted, not recursive); a glob's matches
    (``**`` recurses); each image once. Returns the images and one message per argument that
    names none."""
    images: list[str] = []
    problems: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                problems.append(f"{argument}: no image files in this folder")
            images += found
        elif not path.exists() and glob.has_magic(argument):
            found = sorted(p for p in glob.glob(argument, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{argument}: no file matches")
            images += found
        else:
            images.append(argument)  # a missing file is reported when it is read
    return list(dict.fromkeys(images)), problems  # each image once, where it first came


def batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
