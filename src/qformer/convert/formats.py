"""The checkpoint layouts ``qformer convert`` reads and writes. Kept apart from the
conversion (:mod:`qformer.pretrained.conversion`) so that the command line's options can name them
without importing torch."""

from __future__ import annotations

from typing import Literal

Format = Literal["lavis", "transformers", "qformer"]
FORMATS: tuple[Format, ...] = ("transformers", "lavis", "qformer")
