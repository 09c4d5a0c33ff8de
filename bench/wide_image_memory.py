"""Peak memory of ``load_image`` on one large 16-bit grey PNG (issue #26), standalone:

    PYTHONPATH=src .venv/bin/python bench/wide_image_memory.py [--side 6000] [--rounds 3]

Each round loads the image in a fresh process and reports how far the load raised its peak RSS
(``ru_maxrss`` after the load less before it, the imports done) and the peak bytes numpy and
Python allocated during the load (``tracemalloc``: Pillow's own buffers are not traced). For
scale: Pillow holds the decoded image at 2 bytes per pixel and the RGB result at 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MIB = 2**20
MEASURE = """
import json, resource, sys, tracemalloc
from qformer.data.transforms import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
image = load_image(sys.argv[1])
traced = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_growth_mib": (after - before) / 1024, "traced_peak_mib": traced / 2**20,
                  "size": image.size, "mode": image.mode}))
"""


def grey_png(path: Path, side: int) -> None:
    """A ``side`` square 16-bit grey PNG: a gradient over the whole 0-65535 range, which
    compresses to a small file however large the image."""
    ramp = np.linspace(0, 65535, side).astype(np.uint16)  # (side,)
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(path)  # "I;16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "grey16.png"
        grey_png(path, args.side)
        with Image.open(path) as opened:
            mode = opened.mode
        runs = [json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(path)], check=True,
                                          capture_output=True, text=True, env=os.environ).stdout)
                for _ in range(args.rounds)]
        file_kib = path.stat().st_size / 1024
    pixels = args.side**2
    print(json.dumps({
        "side": args.side, "file_mode": mode, "file_kib": round(file_kib, 1), "rounds": args.rounds,
        "rss_growth_mib": round(statistics.median(run["rss_growth_mib"] for run in runs), 1),
        "traced_peak_mib": round(statistics.median(run["traced_peak_mib"] for run in runs), 1),
        "decoded_mib": round(2 * pixels / MIB, 1), "rgb_mib": round(4 * pixels / MIB, 1),
    }))


if __name__ == "__main__":
    main()
