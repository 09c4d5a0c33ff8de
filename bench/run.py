"""The benchmark suite: each benchmark prints one JSON line (see ``harness.Result``).

    .venv/bin/python bench/run.py            # full sizes (make bench)
    .venv/bin/python bench/run.py --quick    # small sizes, a few minutes on 2 cores (make bench-quick)
    .venv/bin/python bench/run.py --only qformer_fwd_bwd stage1_step --device cuda

Each module named in MODULES defines ``BENCHMARKS``: a name -> ``fn(quick: bool, device: str)``
returning a ``Result``. A benchmark whose two sides disagree fails (AssertionError) instead of
printing a figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
from harness import machine  # noqa: E402

MODULES = ("qformer_step", "retrieval_and_captions", "stage2_generate", "data_pipeline", "loading", "serve",
           "onnx_export")


def benchmarks() -> dict:
    found = {}
    for module in MODULES:
        found.update(importlib.import_module(f"bench_{module}").BENCHMARKS)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these benchmarks only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also append the lines, with the machine, to this JSONL file")
    args = parser.parse_args()
    torch.manual_seed(0)
    found = benchmarks()
    unknown = sorted(set(args.only or ()) - set(found))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {sorted(found)}")
    where = machine()
    print(json.dumps({"machine": where, "device": args.device, "quick": args.quick}), flush=True)
    for name in args.only or found:
        line = found[name](args.quick, args.device).line()
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**json.loads(line), "machine": where, "quick": args.quick}) + "\n")


if __name__ == "__main__":
    main()
