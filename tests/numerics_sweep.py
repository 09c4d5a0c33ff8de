"""Another machine's numerics on this one: the tests marked ``numerics`` (parity with
transformers, LAVIS and BERT, and every equality the library promises) run once per setting
below, each in a fresh pytest process since the kernels are chosen when torch is imported.

A CPU with other vector units (AVX-512, AVX2 alone, none) or another number of cores takes
other kernels and splits reductions otherwise, so a float can differ in its last bits; a test
that passes under every setting here does not rest on this CPU's rounding. Run it as
``make test-numerics`` (all the marked tests) or ``python tests/numerics_sweep.py [PYTEST ARGS]``;
``tests/test_numerics_sweep.py`` runs a cheap part of it inside ``make test``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# Each setting narrows what this CPU would do by default, or splits the work over other threads. ATEN_CPU_CAPABILITY picks
# PyTorch's own vectorised kernels ("default": none); oneDNN and MKL (matrix products,
# convolutions) are narrowed by their own variables. A setting can only narrow: on a CPU
# without AVX-512, "avx2" is what it does anyway.
SETTINGS: dict[str, dict[str, str]] = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "3 threads": {"OMP_NUM_THREADS": "3"},
    "no vector kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "AVX2 only": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def run_setting(setting: dict[str, str], pytest_args: list[str]) -> subprocess.CompletedProcess:
    """pytest on ``pytest_args`` (default: every test marked ``numerics``) with the environment
    variables ``setting``, offline, its output captured."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **setting}
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(pytest_args or ["-m", "numerics"])]
    return subprocess.run(command, cwd=TESTS.parent, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)


def main(argv: list[str]) -> int:
    """Every setting in turn; the last line of each run's summary, then the failures' output."""
    failed = []
    for name in SETTINGS:
        result = run_setting(SETTINGS[name], argv)
        summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
        print(f"{name:>18}: {summary}", flush=True)
        if result.returncode != 0:
            failed.append((name, result))
    for name, result in failed:
        print(f"\n===== {name}: {' '.join(f'{k}={v}' for k, v in SETTINGS[name].items())} =====")
        print(result.stdout[-20000:], result.stderr[-5000:], sep="\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
