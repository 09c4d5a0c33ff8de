"""Image-text retrieval as BLIP-2 evaluates it (Table 5): COCO's 5K Karpathy test and Flickr30K's
1K test, every image against every caption, ITC similarity re-ranked by ITM over the ``k = 128``
best candidates each way (LAVIS's ``compute_sim_matrix``), recall@1/5/10 both ways, for stage-1
models. What it keeps on disk, why, and how ranks share it: docs/evaluation.md, "Retrieval:
resumable, over ranks, from stored features"."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qformer.checkpoint import safetensors_errors, write_safetensors
from qformer.evaluate.benchmarks import karpathy_test
from qformer.evaluate.outputs import barrier, check_settings, library_versions, rank_and_world, write_json
from qformer.pretrained.stage1 import TEXT_MAX_LENGTH, extract_features, tokenize
from qformer.retrieval import (
    RERANK_DEPTH,
    Candidates,
    check_rerank_depth,
    itm_of_images,
    rerank_candidates,
    reranked_scores,
    retrieval_recall,
    similarity_rows,
)

RETRIEVAL_TASKS = {"coco_retrieval": "coco_karpathy_test.json", "flickr_retrieval": "flickr30k_test.json"}
FEATURE_CHUNK = 256  # images (or captions) per feature file
FORMAT = 1  # of the features folder
CAPTION_CLEANING = "LAVIS's pre_caption"


@dataclass(frozen=True)
class RetrievalTest:
    """A retrieval test set: the images (as the annotations name them, and their paths), every
    caption, and each caption's image index."""

    names: list[str]
    paths: list[Path]
    captions: list[str]
    owner: list[int]

    def digest(self) -> str:
        """What identifies the data: the images' names and the captions, in order."""
        return hashlib.sha256(json.dumps([self.names, self.captions]).encode()).hexdigest()


def read_retrieval_test(root: Path, task: str, limit: int | None = None) -> RetrievalTest:
    """The test set of ``task`` under ``root``; with ``limit``, its first images and their captions."""
    images = karpathy_test(root, RETRIEVAL_TASKS[task])[:limit]
    return RetrievalTest([str(image.question_id) for image in images], [image.image for image in images],
                         [caption for image in images for caption in image.answers],
                         [index for index, image in enumerate(images) for _ in image.answers])


class Chunks:
    """``items`` rows kept as numbered safetensors files ``FOLDER/{kind}-NNNNN.safetensors``,
    ``size`` rows each (the last one fewer)."""

    def __init__(self, folder: Path, kind: str, items: int, size: int) -> None:
        self.folder, self.kind, self.items, self.size = folder, kind, items, size
        self.count = -(-items // size)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.kind}-{index:05d}.safetensors"

    def rows(self, index: int) -> slice:
        return slice(index * self.size, min(self.items, (index + 1) * self.size))

    def missing(self, tag: dict[str, str] | None = None) -> list[int]:
        """The chunks not written yet, or written with metadata other than ``tag``."""
        from safetensors import safe_open

        def written(index: int) -> bool:
            if not self.path(index).is_file():
                return False
            if tag is None:
                return True
            with safetensors_errors(self.path(index)), safe_open(self.path(index), framework="pt") as file:
                metadata = file.metadata() or {}
            return all(metadata.get(key) == value for key, value in tag.items())

        return [index for index in range(self.count) if not written(index)]

    def write(self, index: int, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        write_safetensors(self.path(index), tensors, metadata)

    def read(self, index: int, key: str, device: torch.device, check_rows: bool = True) -> Tensor:
        """Tensor ``key`` of chunk ``index`` on ``device``; ``check_rows``: refused unless it holds the
        chunk's rows."""
        from safetensors import safe_open

        path = self.path(index)
        with safetensors_errors(path), safe_open(path, framework="pt", device=str(device)) as file:
            if key not in file.keys():
                raise ValueError(f"{path}: no tensor {key!r}; delete the file to compute it again")
            tensor = file.get_tensor(key)
        wanted = self.rows(index).stop - self.rows(index).start
        if check_rows and tensor.shape[0] != wanted:
            raise ValueError(f"{path}: {tensor.shape[0]} rows where {wanted} belong; delete it to compute it again")
        return tensor


def check_retrieval_test(task: str, data: str | Path, k: int, limit: int | None) -> RetrievalTest:
    """The test split, read (its annotations only) and checked against ``k`` before anything is
    computed: ``qformer eval`` calls it before the model loads, so that a refused ``--k`` costs
    neither the features nor the re-ranking."""
    test = read_retrieval_test(Path(data), task, limit)
    if not test.names:
        raise ValueError(f"{Path(data) / RETRIEVAL_TASKS[task]}: no images to retrieve")
    check_rerank_depth(k, len(test.captions), len(test.names))
    return test


@torch.no_grad()
def evaluate_retrieval_task(model: Any, task: str, data: str | Path, out: str | Path, k: int = RERANK_DEPTH,
                            batch_size: int = 32, limit: int | None = None, fingerprint: str | None = None,
                            features: str | Path | None = None, chunk_size: int = FEATURE_CHUNK) -> dict[str, Any]:
    """Recall@1/5/10 both ways (``txt_r``: image -> text, ``img_r``: text -> image), in percent;
    written to ``OUT/results.json`` with the settings. ``features``: the features folder (default
    ``OUT/features``), reused where an earlier evaluation left it, its missing chunks computed."""
    from qformer.data.transforms import clean_caption

    for name, value in (("k", k), ("batch_size", batch_size), ("chunk_size", chunk_size),
                        ("limit", 1 if limit is None else limit)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    test = check_retrieval_test(task, data, k, limit)
    out = Path(out)
    folder = Path(features) if features is not None else out / "features"
    folder = folder / "features" if (folder / "features").is_dir() else folder  # an earlier OUT names its features
    device = model.ln_vision.weight.device
    feature_settings = {"format": FORMAT, "task": task, "images": len(test.names), "captions": len(test.captions),
                        "data_digest": test.digest(), "chunk_size": chunk_size,
                        "dtype": str(model.ln_vision.weight.dtype),
                        "caption_cleaning": CAPTION_CLEANING, "max_text_tokens": TEXT_MAX_LENGTH,
                        "model_fingerprint": fingerprint}
    settings = {"task": task, "data": str(Path(data).resolve()), "images": len(test.names),
                "captions": len(test.captions), "k": k, "caption_cleaning": CAPTION_CLEANING,
                "max_text_tokens": TEXT_MAX_LENGTH, "model_fingerprint": fingerprint,
                "features": str(folder.resolve()), "versions": library_versions()}
    rank, world = rank_and_world()
    if rank == 0:  # the features first: a refused folder leaves OUT untouched
        check_settings(folder / "settings.json", feature_settings, holds="features computed",
                        remedy="pass another --features (or --out), or delete it to compute them again")
        check_settings(out / "settings.json", settings)
    barrier(world)
    images = Chunks(folder, "images", len(test.names), chunk_size)
    texts = Chunks(folder, "texts", len(test.captions), chunk_size)
    input_ids, attention_mask = tokenize(model, [clean_caption(caption) for caption in test.captions])
    _feature_phase(model, test, images, texts, input_ids, attention_mask, batch_size, task)
    barrier(world)  # every chunk is on disk

    text_feats = torch.cat([texts.read(index, "itc", device) for index in range(texts.count)])  # (Nt, E)
    image_feats = (images.read(index, "itc", device) for index in range(images.count))  # (B, Q, E) each
    candidates = rerank_candidates(similarity_rows(model, image_feats, text_feats), k)  # the same on every rank
    rerank = Chunks(out / "rerank", "itm", len(test.names), chunk_size)
    _rerank_phase(model, candidates, images, rerank, input_ids, attention_mask, batch_size, task)
    barrier(world)  # every re-rank file is on disk
    if rank != 0:
        barrier(world)  # rank 0 writes the results
        return json.loads((out / "results.json").read_text(encoding="utf-8"))
    results = _write_results(candidates, rerank, torch.tensor(test.owner), k, out, settings)
    barrier(world)
    return results


def _feature_phase(model: Any, test: RetrievalTest, images: Chunks, texts: Chunks, input_ids: Tensor,
                   attention_mask: Tensor, batch_size: int, task: str) -> None:
    """Write the missing feature chunks, this rank's share of them."""
    from tqdm import tqdm

    from qformer.data.transforms import eval_image

    rank, world = rank_and_world()
    todo = [(images, index) for index in images.missing()] + [(texts, index) for index in texts.missing()]
    barrier(world)  # every rank has listed the same chunks before any rank writes one
    device = model.ln_vision.weight.device
    for chunks, index in tqdm(todo[rank::world], desc=f"{task} features", unit="chunk", disable=rank != 0):
        rows = chunks.rows(index)
        if chunks is images:
            embeds, itc = [], []
            for start in range(rows.start, rows.stop, batch_size):
                paths = test.paths[start : min(start + batch_size, rows.stop)]
                pixels = torch.stack([eval_image(path, model.config.image) for path in paths])  # (B, 3, H, W)
                embeds.append(model.image_embeds(pixels.to(device)))  # (B, S, W)
                itc.append(extract_features(model, embeds[-1]).image)  # (B, Q, E)
            tensors = {"embeds": torch.cat(embeds), "itc": torch.cat(itc)}
        else:
            tensors = {"itc": torch.cat([
                extract_features(model, input_ids=input_ids[start : start + batch_size],
                                 attention_mask=attention_mask[start : start + batch_size]).text  # (B, E)
                for start in range(rows.start, rows.stop, batch_size)])}
        chunks.write(index, tensors, {"rank": str(rank)})


def _candidates_digest(candidates: Candidates) -> str:
    """What identifies the candidate pairs (and so the re-rank files made for them)."""
    pairs = torch.stack([candidates.image_of, candidates.text_of]).cpu()  # (2, P)
    return hashlib.sha256(pairs.numpy().tobytes()).hexdigest()


def _rerank_phase(model: Any, candidates: Candidates, images: Chunks, rerank: Chunks, input_ids: Tensor,
                  attention_mask: Tensor, batch_size: int, task: str) -> None:
    """ITM over the candidate pairs, one file per image chunk; this rank's share of the missing ones."""
    from tqdm import tqdm

    rank, world = rank_and_world()
    tag = {"candidates": _candidates_digest(candidates)}
    todo = rerank.missing(tag)
    barrier(world)  # every rank has listed the same files before any rank writes one
    device = model.ln_vision.weight.device
    for index in tqdm(todo[rank::world], desc=f"{task} re-rank", unit="chunk", disable=rank != 0):
        embeds = images.read(index, "embeds", device)  # (B, S, W)
        itm = itm_of_images(model, embeds, images.rows(index).start, candidates, input_ids, attention_mask,
                            batch_size)
        rerank.write(index, {"itm": itm}, {**tag, "rank": str(rank)})


def _write_results(candidates: Candidates, rerank: Chunks, owner: Tensor, k: int, out: Path,
                   settings: dict[str, Any]) -> dict[str, Any]:
    """Gather the re-rank files into the score matrices; write them and the recall."""
    device = candidates.sim.device
    itm = torch.cat([rerank.read(index, "itm", device, check_rows=False) for index in range(rerank.count)])
    if itm.shape[0] != candidates.image_of.shape[0]:
        raise ValueError(f"{rerank.folder}: {itm.shape[0]} re-ranked pairs where {candidates.image_of.shape[0]} "
                         "belong; delete it to re-rank again")
    i2t, t2i = reranked_scores(candidates, itm)
    write_safetensors(out / "scores.safetensors", {
        "i2t_texts": candidates.top_text, "i2t_scores": i2t.gather(1, candidates.top_text),  # (Ni, kt)
        "t2i_images": candidates.top_image, "t2i_scores": t2i.gather(1, candidates.top_image)})  # (Nt, ki)
    recall = retrieval_recall(i2t, t2i, owner, k=k)
    results = {**{key: round(value, 2) for key, value in recall.items()}, "count": settings["images"],
               "settings": settings}
    write_json(out / "results.json", results)
    return results
