"""Data parallelism under torchrun: DDP (every process holds the whole model) or FSDP2
(``fully_shard``: weights, gradients and optimiser state split across the processes).

FSDP units: each repeated block of the frozen towers (the image encoder's layers, the LLM's
decoder layers: the classes a model lists in ``_no_split_modules``, transformers' convention)
is one unit, gathered whole only around its own forward (and backward, where gradients pass
through it); the root unit holds everything else, the trainable Q-Former included. The Q-Former
stays whole for the step because the objective calls it several times a step and computes the
image's cross-attention keys and values outside its layers' ``forward``. Scalar weights (the
ITC temperature), which ``fully_shard`` cannot split, stay whole on every process; their
gradients are averaged when the others are reduced.

Precision stays torch.autocast, as with DDP: the frozen towers are stored in their own dtype
(``vision_dtype``, ``llm_dtype``) and gathered at that size, the trainable weights stay fp32 and
their gradients are reduced in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from transformers import GenerationMixin

from qformer.train.distributed import Runtime

try:  # FSDP2 and its sharded tensors, public from torch 2.6 (parallel: fsdp asks for 2.7, see shard)
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.nn.utils import get_total_norm
except ImportError:  # an older torch trains with DDP only, and then nothing is ever sharded
    FSDPModule = DTensor = ()  # isinstance(x, ()) is always False

FSDP_TORCH = "2.7"  # fully_shard's ignored_params, distribute_tensor's src_data_rank


def parallelize(objective: nn.Module, runtime: Runtime, parallel: str) -> nn.Module:
    """The objective ready to train on ``runtime.device``: as it is on one process, else wrapped
    in DDP or (``parallel == "fsdp"``) sharded in place with FSDP2."""
    if runtime.world_size > 1 and parallel == "fsdp":
        return shard(objective, runtime)
    objective.to(runtime.device)
    if runtime.world_size == 1:
        return objective
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids)


def tower_blocks(module: nn.Module) -> list[nn.Module]:
    """Every submodule whose class a module above it lists in ``_no_split_modules``
    (transformers' decoder layers and encoder blocks, EvaViT's blocks), innermost first."""
    names = {name for m in module.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    return [m for m in reversed(list(module.modules())) if type(m).__name__ in names]


def shard(objective: nn.Module, runtime: Runtime) -> nn.Module:
    """FSDP2 over all processes (a 1-D mesh), in place: the tower blocks, then the root. Each
    unit's weights move to ``runtime.device`` as it is sharded, so the whole model never has to
    fit one device."""
    if torch.__version__ < FSDP_TORCH:
        raise RuntimeError(f"parallel: fsdp needs torch {FSDP_TORCH} or newer (FSDP2's fully_shard with "
                           f"ignored_params); this is torch {torch.__version__}: upgrade it or use parallel: ddp")
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    scalars = {p for p in objective.parameters() if p.ndim == 0}
    for param in scalars:
        param.data = param.data.to(runtime.device)
    for block in tower_blocks(objective):
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    for module in objective.modules():
        if isinstance(module, GenerationMixin):  # transformers' FSDP2 flag: generate steps every rank together
            module._is_fsdp_managed_module = True
    fully_shard(objective, mesh=mesh, ignored_params=scalars)
    return objective


def is_sharded(objective: nn.Module) -> bool:
    """Whether :func:`shard` made ``objective`` an FSDP2 root."""
    return isinstance(objective, FSDPModule)


def whole(tensor: Tensor) -> Tensor:
    """All of a tensor: a sharded one (FSDP's DTensor) gathered from every process, which must
    all call this; any other as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: Tensor, like: Tensor) -> Tensor:
    """A whole tensor held as ``like`` is: this process's shard when ``like`` is sharded."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def gradient_sync(objective: nn.Module, enabled: bool) -> AbstractContextManager:
    """Around a micro-step's backward: if ``enabled`` the gradients are averaged over the
    processes by the end of the block, else they accumulate on each process (DDP's ``no_sync``,
    FSDP's ``set_requires_gradient_sync(False)``)."""
    if isinstance(objective, FSDPModule):
        return _fsdp_sync(objective, enabled)
    if isinstance(objective, DistributedDataParallel) and not enabled:
        return objective.no_sync()
    return nullcontext()


@contextmanager
def _fsdp_sync(objective: FSDPModule, enabled: bool) -> Iterator[None]:
    """FSDP reduce-scatters the sharded gradients in backward; the whole (scalar) ones are
    averaged here, after it."""
    objective.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        objective.set_requires_gradient_sync(True)
    if enabled:
        world = dist.get_world_size()
        for param in objective.parameters():
            if param.grad is not None and not isinstance(param.grad, DTensor):
                dist.all_reduce(param.grad)
                param.grad /= world


def gradient_norm(parameters: Iterable[nn.Parameter]) -> Tensor:
    """The 2-norm of all gradients together, where they may be sharded (FSDP's DTensors, each
    process holding a slice) next to whole ones, each element counted once: the same on every
    process. No host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        norms = [torch.linalg.vector_norm(g) for g in grads]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    squares = get_total_norm([g.to_local() for g in grads if isinstance(g, DTensor)]) ** 2
    dist.all_reduce(squares)
    whole_grads = [g for g in grads if not isinstance(g, DTensor)]
    return (squares + get_total_norm(whole_grads).to(squares.device) ** 2).sqrt()


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` where gradients may be sharded (see
    :func:`gradient_norm`); returns the norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    total = gradient_norm(parameters)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_ scales
    for param in parameters:
        grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
        grad.mul_(scale.to(grad.device))
    return total


@contextmanager
def whole_root(objective: nn.Module) -> Iterator[None]:
    """For calls that bypass the objective's ``forward`` (evaluation calls the model's methods):
    with FSDP the root unit's weights are gathered whole until the block exits, while the tower
    blocks gather theirs in their own forward. Every process must enter it. Without FSDP, nothing."""
    if not isinstance(objective, FSDPModule):
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()
