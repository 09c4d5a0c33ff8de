"""The cheap part of ``make test-numerics`` inside ``make test``: a few equality- and
parity-critical tests, one of each kind, in two fresh processes that together cover every
setting of tests/numerics_sweep.py (1 thread with PyTorch's vector kernels off; 3 threads with
AVX2 alone), so that a test resting on this CPU's rounding fails here and not first on another
machine. Each process costs about 15 s, mostly imports: ``make test-numerics`` takes the settings
one at a time."""

import pytest
from numerics_sweep import SETTINGS, run_setting

PAIRS = {f"{a}, {b}": {**SETTINGS[a], **SETTINGS[b]} for a, b in (("1 thread", "no vector kernels"),
                                                                   ("3 threads", "AVX2 only"))}

# One test of each kind of promise: features of one image alone and in a batch (fp32 rounding),
# a batch's identical rows, tokens decoded in a batch and one by one (exact), transformers'
# Q-Former (1e-5), the stage-1 losses against the reference step. Resumed runs (bitwise on one
# machine) take longer: they are in the full sweep only.
CHEAP = [
    "tests/test_stage1_usage.py::test_extract_features_equals_the_tensor_level_one",
    "tests/test_finetune.py::test_the_question_reaches_the_qformer_only_when_asked",
    "tests/test_generation_and_retrieval.py::test_batched_equals_one_by_one",
    "tests/test_transformers_parity.py",
    "tests/test_stage1.py",
]


@pytest.mark.parametrize("setting", PAIRS)
def test_cheap_numerics_pass_under(setting: str) -> None:
    result = run_setting(PAIRS[setting], CHEAP)
    assert result.returncode == 0, f"{setting}: {PAIRS[setting]}\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout.splitlines()[-1]
