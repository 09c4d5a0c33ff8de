"""Loading at full size: the model is built on the meta device (no random initialisation of
weights about to be overwritten), its keys and shapes are checked against the checkpoint's
headers, then the safetensors shards are read one at a time and every tensor is cast and placed
where it belongs and assigned. Half precision, devices and ``device_map`` (accelerate) live here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from qformer.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_state_dict, load_plain, safetensors_errors
from qformer.config import ConfigBase
from qformer.devices import DTYPES, DeviceArg, DeviceMapArg, dtype_name, parse_device, parse_dtype

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint file, known from the file's header, not read yet."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (``TRANSFORMERS_OFFLINE`` where it is
    unset): unset, the hub is online, from Python and from the ``qformer`` command alike (the
    tests and CI set it)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    return value.strip().lower() not in ("0", "", "false", "no", "off")


def check_source(value: str, key: str) -> str:
    """A model path of a recipe: a local file or directory, or a hub id that can be fetched (the
    hub online, or the id in the local cache). Otherwise one line naming ``key`` and what to do."""
    if Path(value).expanduser().exists() or not hub_offline():
        return value
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(value, name), str) for name in ("config.json", "tokenizer_config.json")):
        return value
    raise FileNotFoundError(
        f"{key}: {value!r} is not a local path, and as a hub id it is not cached while the hub is offline "
        f"(HF_HUB_OFFLINE=1): point it at a local directory (--{key} /path/to/model), or set HF_HUB_OFFLINE=0 to "
        "download it"
    )


def resolve_checkpoint(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id, downloaded unless the hub is offline, when
    the local Hugging Face cache is read alone. A download that fails is one line naming what
    was asked for and what to do, in place of huggingface_hub's paragraph about the network (the
    hub is online by default, as in transformers, so a mistyped path is most often reported from here)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if hub_offline():
        try:
            return Path(snapshot_download(str(path_or_hub_id), local_files_only=True))
        except (HFValidationError, LocalEntryNotFoundError) as err:
            raise FileNotFoundError(
                f"{path_or_hub_id} is not a local directory, nor a hub id in the local cache, and HF_HUB_OFFLINE is "
                "set: point to a directory holding config.json and the weights, or set HF_HUB_OFFLINE=0 to download "
                "a hub id") from err
    try:
        return Path(snapshot_download(str(path_or_hub_id)))
    except HFValidationError as err:
        raise FileNotFoundError(f"{path_or_hub_id} is not a local directory, nor a hub id (owner/name)") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{path_or_hub_id} is not a local directory, nor a model on the hub that this machine may read: check "
            "the name (a private or gated model needs `hf auth login`)"
        ) from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{path_or_hub_id} is not a local directory, and as a hub id it could not be downloaded (the hub did not "
            "answer) nor found in the local cache: check the connection, or point to a local directory"
        ) from err


def weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, the shards of ``model.safetensors.index.json`` or ``pytorch_model.bin``."""
    single, index, legacy = (directory / n for n in
                             ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
        return [directory / s for s in shards]
    if legacy.is_file():
        return [legacy]
    raise FileNotFoundError(f"no weights in {directory}: expected model.safetensors, a sharded index or "
                            "pytorch_model.bin")


def _load_bin(file: Path) -> dict[str, Tensor]:
    """A ``pytorch_model.bin`` memory-mapped, with ``weights_only=True`` (no code runs)."""
    import zipfile

    return load_plain(file, mmap=zipfile.is_zipfile(file))  # torch.save's zip format maps lazily


def index_checkpoint(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor's file, shape and dtype, from the headers alone."""
    from safetensors import safe_open

    stored: dict[str, StoredTensor] = {}
    for file in weight_files(Path(directory)):
        if file.suffix == ".bin":
            for name, tensor in _load_bin(file).items():
                stored[name] = StoredTensor(file, name, tuple(tensor.shape), tensor.dtype)
            continue
        with safetensors_errors(file), safe_open(file, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                stored[name] = StoredTensor(file, name, tuple(piece.get_shape()),
                                            _SAFETENSORS_DTYPES[piece.get_dtype()])
    return stored


CONVERT_WORKERS = 2


def _read_converted(file: Path, keys: list[str], stored: Mapping[str, StoredTensor], target, out: dict) -> None:
    """Tensors of one safetensors file that change dtype or device: each is read through a
    memory map, converted, and its pages dropped from this process at once (madvise), so the
    file is never resident beside what it is converted into."""
    import mmap
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        offsets = {name: entry["data_offsets"] for name, entry in json.loads(f.read(header_size)).items()
                   if name != "__metadata__"}
        base = 8 + header_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:

            def convert(key: str) -> None:
                item, (begin, end) = stored[key], offsets[stored[key].name]
                dtype, device = target(key, item)
                if end == begin:
                    out[key] = torch.empty(item.shape, dtype=dtype, device=device)
                    return
                with warnings.catch_warnings():  # read-only memory: the view is only read, then copied
                    warnings.simplefilter("ignore", UserWarning)
                    view = torch.frombuffer(mapped, dtype=item.dtype, count=(end - begin) // item.dtype.itemsize,
                                            offset=base + begin)
                out[key] = view.view(item.shape).to(device=device, dtype=dtype, copy=True)
                del view
                start = (base + begin) // mmap.PAGESIZE * mmap.PAGESIZE
                mapped.madvise(mmap.MADV_DONTNEED, start, base + end - start)

            with ThreadPoolExecutor(CONVERT_WORKERS) as pool:  # copies release the GIL; two tensors in flight
                list(pool.map(convert, keys))


def read_tensors(
    stored: Mapping[str, StoredTensor], target: Callable[[str, StoredTensor], tuple[torch.dtype, torch.device]]
) -> dict[str, Tensor]:
    """Read ``stored`` file by file, each tensor cast and moved to ``target(key, stored)``.
    A tensor kept as stored on the CPU stays a view of the memory-mapped file (safetensors); the
    others are converted one by one, their file pages released as they go."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key, item in stored.items():
        by_file.setdefault(item.file, []).append(key)
    out: dict[str, Tensor] = {}
    for file, keys in by_file.items():
        if file.suffix == ".bin":
            tensors = _load_bin(file)
            for key in keys:
                dtype, device = target(key, stored[key])
                out[key] = tensors[stored[key].name].to(device=device, dtype=dtype)
            continue
        kept = {k for k in keys if target(k, stored[k]) == (stored[k].dtype, torch.device("cpu"))}
        with safetensors_errors(file), safe_open(file, framework="pt", backend="mmap") as mapped:
            out.update({key: mapped.get_tensor(stored[key].name) for key in keys if key in kept})
        _read_converted(file, [k for k in keys if k not in kept], stored, target, out)
    return out


def auto_dtype(config_values: Mapping[str, Any], stored: Mapping[str, StoredTensor]) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's ``dtype`` (or ``torch_dtype``), else the first
    floating-point tensor's."""
    named = config_values.get("dtype") or config_values.get("torch_dtype")
    if named:
        return DTYPES[dtype_name(named)]
    for item in stored.values():
        if item.dtype.is_floating_point:
            return item.dtype
    return torch.float32


def keep_fp32_rule(patterns: Iterable[str], strict_patterns: Iterable[str] = ()) -> Callable[[str, torch.dtype], bool]:
    """transformers' ``_keep_in_fp32_modules`` (when loading in fp16) and
    ``_keep_in_fp32_modules_strict`` (fp16 or bf16): a pattern found anywhere in the name."""
    loose = re.compile("|".join(patterns)) if patterns else None
    strict = re.compile("|".join(strict_patterns)) if strict_patterns else None

    def keep(name: str, dtype: torch.dtype) -> bool:
        if loose is not None and dtype == torch.float16 and loose.search(name):
            return True
        return strict is not None and dtype in (torch.float16, torch.bfloat16) and bool(strict.search(name))

    return keep


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one object (tied embeddings), also on the meta device."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(model: nn.Module, groups: list[list[str]]) -> None:
    """After ``assign=True`` every name holds its own parameter: make each group one again."""
    for names in groups:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)


@dataclass
class Placement:
    """Where each tensor goes: ``main`` for the BLIP-2 part and anything unmapped; with
    ``llm_map``, the LLM's modules (names under ``llm_prefix``) spread over devices."""

    main: torch.device
    llm_prefix: str = "language_model."
    llm_map: dict[str, torch.device] | None = None

    def device_of(self, key: str) -> torch.device:
        if self.llm_map is None or not key.startswith(self.llm_prefix):
            return self.main
        name = key[len(self.llm_prefix):]
        best = max((m for m in self.llm_map if m == "" or name == m or name.startswith(m + ".")), key=len,
                   default=None)
        if best is None:
            raise ValueError(f"device_map places no module holding {key}: add it, or a parent, or ''")
        return self.llm_map[best]


def _device_map_device(value: Any) -> torch.device:
    if value == "disk":
        raise ValueError("device_map: disk offload is not supported; map every module to a GPU or the CPU")
    return parse_device(value)


def plan_placement(
    model: nn.Module, device: DeviceArg, device_map: DeviceMapArg, dtype_of: Callable[[str], torch.dtype],
    llm_attr: str | None = "language_model", max_memory: Mapping | None = None,
) -> Placement:
    """``device`` puts everything on one device. ``device_map="auto"`` puts the BLIP-2 part on
    the first GPU (else MPS, else the CPU) and spreads the LLM's layers over what is left of
    every GPU and the CPU (accelerate); an explicit map names module prefixes (transformers'
    names: ``language_model.model.decoder.layers.3``) or ``""``; the image encoder, Q-Former and
    projection always stay together on one device."""
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if device_map is None:
        return Placement(parse_device(device))
    if isinstance(device_map, str) and device_map != "auto":
        return Placement(parse_device(device_map))
    llm = getattr(model, llm_attr, None) if llm_attr else None
    prefix = f"{llm_attr}."
    if device_map == "auto":
        return _auto_placement(model, llm, prefix, dtype_of, max_memory)
    mapped = {str(k): _device_map_device(v) for k, v in device_map.items()}
    own = {k: v for k, v in mapped.items() if not (llm is not None and (k + ".").startswith(prefix))}
    if len(set(own.values())) > 1:
        raise ValueError(f"device_map: the image encoder, Q-Former and projection stay on one device, got {own}")
    main = next(iter(own.values()), None)
    if main is None:
        raise ValueError("device_map: say where the image encoder and Q-Former go ('' or 'vision', 'qformer', ...)")
    if llm is None:
        return Placement(main)
    llm_map = {k[len(prefix):] if k != llm_attr else "": v for k, v in mapped.items() if (k + ".").startswith(prefix)}
    llm_map.setdefault("", mapped.get("", main))
    return Placement(main, prefix, llm_map)


def _auto_placement(model, llm, prefix, dtype_of, max_memory) -> Placement:
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_max_memory

    memory = get_max_memory(dict(max_memory) if max_memory else None)
    gpus = sorted(k for k in memory if isinstance(k, int))
    if gpus:
        main = torch.device("cuda", gpus[0])
    elif torch.backends.mps.is_available():
        main = torch.device("mps")
    else:
        main = torch.device("cpu")
    if llm is None or not gpus:
        return Placement(main)
    own_bytes = sum(p.numel() * dtype_of(n).itemsize for n, p in model.named_parameters()
                    if not n.startswith(prefix))
    memory[gpus[0]] = max(0, memory[gpus[0]] - own_bytes)
    special = {n: dtype_of(prefix + n) for n, _ in llm.named_parameters()}
    llm_map = infer_auto_device_map(llm, max_memory=memory, no_split_module_classes=list(llm._no_split_modules or ()),
                                    special_dtypes=special)
    if "disk" in llm_map.values():
        raise ValueError("device_map='auto': the model does not fit in the GPUs' and the CPU's memory (disk offload "
                         "is not supported)")
    return Placement(main, prefix, {k: _device_map_device(v) for k, v in llm_map.items()})


def build_empty(build: Callable[[], M]) -> M:
    """``build()`` with its parameters on the meta device: no memory, no random initialisation.
    Buffers computed in ``__init__`` (rotary tables, ...) stay real."""
    from accelerate import init_empty_weights
    from transformers import PreTrainedModel

    with init_empty_weights():
        model = build()
    for module in model.modules():  # accelerate's meta parameters come apart from what they were tied to
        if isinstance(module, PreTrainedModel):
            module.tie_weights()
    return model


def load_checkpoint(
    model: nn.Module,
    stored: Mapping[str, StoredTensor],
    *,
    dtype: torch.dtype,
    device: DeviceArg = None,
    device_map: DeviceMapArg = None,
    keep_fp32: Callable[[str, torch.dtype], bool] | None = None,
    llm_attr: str | None = "language_model",
    max_memory: Mapping | None = None,
    llm_loaded: bool = False,
) -> nn.Module:
    """Fill ``model`` (from :func:`build_empty`) with ``stored`` (keyed by the model's names;
    tied parameters may be stored once): each tensor cast to ``dtype`` (fp32 where
    ``keep_fp32``), placed, and assigned. Keys and shapes are checked first: every missing,
    unexpected or mis-shaped key is named before anything is read. ``llm_loaded``: the LLM
    came loaded (quantised by transformers); its keys are neither checked nor read here."""
    tied = tied_parameters(model)
    stored = dict(stored)
    for names in tied:
        present = [n for n in names if n in stored]
        for name in names:
            if present and name not in stored:
                stored[name] = stored[present[0]]
    loaded_prefix = f"{llm_attr}." if llm_loaded else None
    if loaded_prefix:
        stored = {k: v for k, v in stored.items() if not k.startswith(loaded_prefix)}
        tied = [names for names in tied if not names[0].startswith(loaded_prefix)]
    check_state_dict(model, stored, loaded_prefix)

    def dtype_of(key: str, stored_dtype: torch.dtype | None = None) -> torch.dtype:
        if stored_dtype is not None and not stored_dtype.is_floating_point:
            return stored_dtype
        return torch.float32 if keep_fp32 is not None and keep_fp32(key, dtype) else dtype

    placement = plan_placement(model, device, device_map, dtype_of, None if llm_loaded else llm_attr, max_memory)
    # a tied group is read once: every name of it gets the same tensor
    aliases = {n: names[0] for names in tied for n in names[1:] if names[0] in stored}
    tensors = read_tensors({k: v for k, v in stored.items() if k not in aliases},
                           lambda key, item: (dtype_of(key, item.dtype), placement.device_of(key)))
    tensors.update({alias: tensors[first] for alias, first in aliases.items()})
    if loaded_prefix:  # the LLM's keys were checked by transformers as it loaded them
        result = model.load_state_dict(tensors, strict=False, assign=True)
        assert not result.unexpected_keys and all(k.startswith(loaded_prefix) for k in result.missing_keys)
    else:
        model.load_state_dict(tensors, strict=True, assign=True)
    retie(model, tied)
    _place_buffers(model, placement, loaded_prefix)
    if placement.llm_map is not None and len(placement.llm_map) > 1:
        from accelerate import dispatch_model

        llm = getattr(model, llm_attr)
        skip = getattr(llm, "_skip_keys_device_placement", None)
        dispatch_model(llm, {k: str(v) for k, v in placement.llm_map.items()}, main_device=str(placement.main),
                       skip_keys=list(skip) if skip else None, force_hooks=True)
    return model


def _place_buffers(model: nn.Module, placement: Placement, loaded_prefix: str | None = None) -> None:
    """Buffers computed in ``__init__`` (not in the checkpoint) go where their module's weights went."""
    for module_name, module in model.named_modules():
        if loaded_prefix and f"{module_name}.".startswith(loaded_prefix):
            continue
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            key = f"{module_name}.{name}" if module_name else name
            module._buffers[name] = buffer.to(placement.device_of(key))


def load_quantized_llm(
    directory: Path, text_config: Mapping[str, Any], quantization_config: Any, dtype: torch.dtype,
    device: DeviceArg, device_map: DeviceMapArg, prefix: str = "language_model.",
) -> nn.Module:
    """The LLM of a BLIP-2 directory (its keys under ``prefix``), quantised as it loads by
    transformers (bitsandbytes 8-bit / 4-bit, ...): missing or mis-shaped keys fail, named."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(**text_config)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    if device_map is None:
        device_map = {"": str(parse_device(device))}
    elif isinstance(device_map, Mapping):
        device_map = {k.removeprefix(prefix.rstrip(".")).removeprefix("."): v for k, v in device_map.items()
                      if (k + ".").startswith(prefix) or k == ""}
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its report lists every non-LLM key as unexpected: they are ours
    try:
        llm, info = auto.from_pretrained(directory, config=config, key_mapping={f"^{re.escape(prefix)}": ""},
                                         quantization_config=quantization_config, dtype=dtype,
                                         device_map=device_map, output_loading_info=True)
    finally:
        transformers_logging.set_verbosity(verbosity)
    problems = [*info["missing_keys"], *(str(k) for k in info["mismatched_keys"])]
    if problems:
        raise ValueError(f"{directory}: the LLM's weights do not fit its config: {sorted(problems)}")
    return llm


def model_fingerprint(directory: Path) -> str:
    """What identifies a model's weights: its config and its weight files' names, sizes and
    modification times (hashing gigabytes at every start would be slow)."""
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pth"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def load_model(
    model_cls: Callable[[Any], M],
    config_cls: type[ConfigBase],
    path_or_hub_id: str | Path,
    dtype: Any = None,
    device: Any = None,
    device_map: Any = None,
    keep_fp32: Callable[[str, torch.dtype], bool] | None = None,
    config_for_dtype: Callable[[Any, str], Any] | None = None,
) -> M:
    """A model saved by ``save_model``: built on the meta device, checked strictly, its tensors
    read in ``dtype`` (None or "auto": as stored; fp32 where ``keep_fp32``) onto ``device``
    (``device_map`` may name one device, or "auto" for the first GPU). ``config_for_dtype``
    records the chosen dtype in the config before the model is built."""
    directory = resolve_checkpoint(path_or_hub_id)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: expected a directory written by save_pretrained")
    config = config_cls.load(directory / CONFIG_NAME)
    stored = index_checkpoint(directory)
    requested = parse_dtype(dtype)
    main = auto_dtype({}, stored) if requested == "auto" else requested
    if config_for_dtype is not None:
        config = config_for_dtype(config, dtype_name(main))
    model = build_empty(lambda: model_cls(config))
    load_checkpoint(model, stored, dtype=main, device=device, device_map=device_map, keep_fp32=keep_fp32,
                    llm_attr=None)
    return model
