"""Two gloo processes with batch b against one process with batch 2b: the same losses and, after
DDP's gradient averaging, the same gradients."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from stage1_helpers import tiny_batch, tiny_stage1
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from qformer.losses import HardNegatives
from qformer.objective import Stage1Objective

LOCAL = 3
WORLD = 2
NEG_IMAGE = torch.tensor([4, 2, 0, 5, 1, 3])  # global indices, across ranks
NEG_TEXT = torch.tensor([3, 5, 4, 0, 2, 1])
IMAGE_IDS = torch.tensor([0, 1, 2, 0, 3, 4])  # pairs 0 and 3 share an image (on different ranks)


def _worker(rank: int, init_file: str, out_dir: str, fixed: bool, with_ids: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        ids, mask, features = tiny_batch(WORLD * LOCAL)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        objective = DistributedDataParallel(Stage1Objective(tiny_stage1(), group=dist.group.WORLD))
        negatives = HardNegatives(NEG_IMAGE[rows], NEG_TEXT[rows], torch.ones(LOCAL, dtype=torch.bool))
        out = objective(
            ids[rows],
            mask[rows],
            image_features=features[rows],
            image_ids=IMAGE_IDS[rows] if with_ids else None,
            negatives=negatives if fixed else None,
            generator=torch.Generator().manual_seed(rank),
        )
        out.loss.backward()
        losses = torch.stack([out.itc, out.itm, out.itg]).detach()
        dist.all_reduce(losses)
        grads = {n: p.grad for n, p in objective.module.model.named_parameters() if p.grad is not None}
        torch.save(
            {"losses": losses / WORLD, "grads": grads, "negatives": out.negatives},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path: Path, fixed: bool, with_ids: bool) -> list[dict]:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), fixed, with_ids), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(with_ids: bool):
    model = tiny_stage1()
    ids, mask, features = tiny_batch(WORLD * LOCAL)
    negatives = HardNegatives(NEG_IMAGE, NEG_TEXT, torch.ones(WORLD * LOCAL, dtype=torch.bool))
    out = Stage1Objective(model)(
        ids, mask, image_features=features, image_ids=IMAGE_IDS if with_ids else None, negatives=negatives
    )
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([out.itc, out.itm, out.itg]).detach(), grads


@pytest.mark.numerics
@pytest.mark.parametrize("with_ids", [False, True])
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, with_ids):
    results = run_two_processes(tmp_path, fixed=True, with_ids=with_ids)
    losses, grads = single_process(with_ids)
    for result in results:
        assert_close(result["losses"], losses, rtol=1e-5, atol=1e-5)  # ITC, ITM, ITG
        assert sorted(result["grads"]) == sorted(grads)
        for name, grad in grads.items():
            assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_sampled_negatives_come_from_every_rank(tmp_path):
    results = run_two_processes(tmp_path, fixed=False, with_ids=False)
    for rank, result in enumerate(results):
        negatives = result["negatives"]
        own = torch.arange(LOCAL) + rank * LOCAL
        assert negatives.valid.all()
        assert ((negatives.image >= 0) & (negatives.image < WORLD * LOCAL)).all()
        assert (negatives.image != own).all() and (negatives.text != own).all()
    # DDP kept the gradients identical on both ranks
    for name, grad in results[0]["grads"].items():
        assert_close(results[1]["grads"][name], grad, msg=name)


if os.environ.get("QFORMER_SKIP_MULTIPROCESS"):
    pytestmark = pytest.mark.skip("QFORMER_SKIP_MULTIPROCESS is set")
