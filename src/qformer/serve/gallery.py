"""The image gallery a stage-1 model searches: its features computed once, kept on disk.

The index folder (default ``GALLERY/.qformer-index``) holds ``features.safetensors`` (each
image's normalised ITC features (Q, E), and those of the gallery's texts (E,)) and
``manifest.json``: the model's fingerprint and, per image file, its size and modification time.
A refresh encodes only the images that are new or changed, drops the removed ones, and
rewrites both files atomically (features first; a manifest always names features that exist).
Another model, or a manifest from another version of this format, rebuilds the index.

Search follows BLIP-2's retrieval: ITC similarity ranks everything, the ``k`` best are
re-scored with ITM logit + ITC similarity (for text -> images the candidates' images are
encoded again: the index keeps the small ITC features, not the image encoder's outputs).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from qformer.checkpoint import atomic_write, read_safetensors, write_safetensors
from qformer.data.image_files import IMAGE_SUFFIXES, batches
from qformer.models.blip2 import expand_key_values
from qformer.pretrained.stage1 import Blip2Stage1, extract_features, image_embeds_of, tokenize
from qformer.retrieval import itm_match_logits, read_pixels

logger = logging.getLogger(__name__)

FORMAT = 1
TEXTS_FILE = "texts.txt"  # optional: one text per line, what an image query searches
INDEX_FOLDER = ".qformer-index"


@dataclass(frozen=True)
class Hit:
    """One search result: an image's name (or a text), ITM logit + ITC similarity, and the ITC
    similarity alone."""

    item: str
    score: float
    itc: float


class Gallery:
    """A folder of images (not recursive; the suffixes of ``qformer caption``) and, optionally,
    its ``texts.txt``, indexed for ``model``."""

    def __init__(self, model: Blip2Stage1, folder: str | Path, fingerprint: str, index: str | Path | None = None,
                 batch_size: int = 16) -> None:
        self.model, self.folder, self.fingerprint = model, Path(folder), fingerprint
        if not self.folder.is_dir():
            raise ValueError(f"--gallery {folder}: not a folder")
        self.index = Path(index) if index is not None else self.folder / INDEX_FOLDER
        self.batch_size = batch_size
        self.names: list[str] = []  # readable images, in the rows of image_features
        self.image_features = torch.empty(0)  # (N, Q, E)
        self.texts: list[str] = []
        self.text_features = torch.empty(0)  # (M, E)
        self.unreadable: dict[str, str] = {}  # name -> why
        self._entries: dict[str, dict] = {}  # name -> {"size", "mtime_ns"[, "unreadable"]}
        self._signature: tuple | None = None
        self._folder_times: tuple | None = None
        self._load_index()

    def signature(self) -> tuple:
        """What changes when images are added, removed or rewritten (or the texts change)."""
        entries = []
        with os.scandir(self.folder) as scan:
            for entry in scan:
                if entry.is_file() and (Path(entry.name).suffix.lower() in IMAGE_SUFFIXES or entry.name == TEXTS_FILE):
                    stat = entry.stat()
                    entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
        return tuple(sorted(entries))

    def refresh(self) -> dict[str, int]:
        """Bring the index up to date with the folder: encode new and changed images, drop
        removed ones. Returns the counts (added, removed, unreadable, images, texts)."""
        self.index.mkdir(parents=True, exist_ok=True)  # made now, it does not change the folder's time later
        self._folder_times = self.folder_times()  # before the scan: a change during it shows next time
        signature = self.signature()
        if signature == self._signature:
            return {"added": 0, "removed": 0, "unreadable": len(self.unreadable), "images": len(self.names),
                    "texts": len(self.texts)}
        current = {name: {"size": size, "mtime_ns": mtime} for name, size, mtime in signature if name != TEXTS_FILE}
        unchanged = {name for name, stat in current.items()
                     if {k: self._entries.get(name, {}).get(k) for k in stat} == stat}
        keep = [row for row, name in enumerate(self.names) if name in unchanged]
        features = [self.image_features[keep]] if keep else []
        names = [self.names[row] for row in keep]
        entries = {name: self._entries[name] for name in unchanged}
        unreadable = {name: why for name, why in self.unreadable.items() if name in unchanged}
        new = sorted(set(current) - unchanged)
        for chunk in batches(new, self.batch_size):
            kept, pixels = self._read(chunk, unreadable)
            for name in chunk:
                entries[name] = dict(current[name], **({"unreadable": unreadable[name]} if name in unreadable else {}))
            if kept:
                features.append(extract_features(self.model, image_embeds_of(self.model, pixels)).image.float().cpu())
                names += kept
        removed = len(set(self.names) - set(current))
        self.names, self._entries, self.unreadable = names, entries, unreadable
        self.image_features = torch.cat(features) if features else torch.empty(0)
        self._refresh_texts()
        self._save_index()
        self._signature = signature
        counts = {"added": len(new) - sum(1 for name in new if name in unreadable), "removed": removed,
                  "unreadable": len(unreadable), "images": len(names), "texts": len(self.texts)}
        logger.info("gallery %s: %s", self.folder, ", ".join(f"{v} {k}" for k, v in counts.items()))
        return counts

    def folder_times(self) -> tuple[int, int | None]:
        """The folder's modification time (it changes when a file is added, removed or renamed
        into it) and texts.txt's: two stats, where :meth:`signature` stats every file."""
        texts = self.folder / TEXTS_FILE
        return self.folder.stat().st_mtime_ns, texts.stat().st_mtime_ns if texts.is_file() else None

    def refresh_if_changed(self) -> None:
        """Refresh when files came, went or were renamed in, or texts.txt changed (each search
        calls this: two stats, not a scan of a folder of any size)."""
        if self.folder_times() != self._folder_times:
            self.refresh()

    @torch.no_grad()
    def search_text(self, text: str, top: int, k: int) -> list[Hit]:
        """The gallery's images that best match ``text``."""
        if not self.names:
            raise ValueError(f"the gallery {self.folder} holds no readable image")
        input_ids, attention_mask = tokenize(self.model, [text])
        query = extract_features(self.model, input_ids=input_ids, attention_mask=attention_mask).text.float().cpu()
        itc = self.model.similarity(self.image_features, query)[:, 0]  # (N,)
        itc_top, rows = itc.topk(min(k, len(self.names)))
        embeds = image_embeds_of(self.model, [str(self.folder / self.names[row]) for row in rows.tolist()])
        kv = self.model.qformer.encoder_key_values(embeds)
        itm = itm_match_logits(self.model, kv, input_ids.expand(len(rows), -1), attention_mask.expand(len(rows), -1))
        return _ranked([self.names[row] for row in rows.tolist()], itm.float().cpu() + itc_top, itc_top, top)

    @torch.no_grad()
    def search_image(self, image: Image.Image, top: int, k: int) -> list[Hit]:
        """The gallery's texts that best match ``image``."""
        if not self.texts:
            raise ValueError(f"the gallery {self.folder} has no {TEXTS_FILE}: nothing for an image to search")
        embeds = image_embeds_of(self.model, [image])  # (1, S, W)
        kv = self.model.qformer.encoder_key_values(embeds)
        image = self.model.image_features(self.model.query_pass(kv).last_hidden_state).float().cpu()  # (1, Q, E)
        itc = self.model.similarity(image, self.text_features)[0]  # (M,)
        itc_top, rows = itc.topk(min(k, len(self.texts)))
        texts = [self.texts[row] for row in rows.tolist()]
        input_ids, attention_mask = tokenize(self.model, texts)
        index = torch.zeros(len(texts), dtype=torch.long, device=embeds.device)
        itm = itm_match_logits(self.model, expand_key_values(kv, index), input_ids, attention_mask)
        return _ranked(texts, itm.float().cpu() + itc_top, itc_top, top)

    def _read(self, names: list[str], unreadable: dict[str, str]) -> tuple[list[str], Tensor | None]:
        """The readable ``names`` and their pixels; each unreadable one noted with why."""
        messages: list[str] = []
        kept, pixels = read_pixels(self.model, [str(self.folder / name) for name in names], messages)
        readable = {Path(path).name for path in kept}
        for name, message in zip([n for n in names if n not in readable], messages, strict=True):
            unreadable[name] = message
            logger.warning("gallery: %s", message)
        return [name for name in names if name in readable], pixels

    def _refresh_texts(self) -> None:
        file = self.folder / TEXTS_FILE
        lines = file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
        texts = [line.strip() for line in lines if line.strip()]
        if texts == self.texts and len(self.text_features) == len(texts):
            return
        features = []
        for chunk in batches(texts, self.batch_size):
            input_ids, attention_mask = tokenize(self.model, chunk)
            features.append(extract_features(self.model, input_ids=input_ids,
                                             attention_mask=attention_mask).text.float().cpu())
        self.texts, self.text_features = texts, (torch.cat(features) if features else torch.empty(0))

    def _load_index(self) -> None:
        manifest_file, features_file = self.index / "manifest.json", self.index / "features.safetensors"
        if not manifest_file.is_file():
            return
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT or manifest.get("model") != self.fingerprint:
                logger.info("gallery index %s is for another model or format: rebuilding it", self.index)
                return
            tensors = read_safetensors(features_file)
            images, texts = tensors.get("images", torch.empty(0)), tensors.get("texts", torch.empty(0))
            if len(images) != len(manifest["names"]) or len(texts) != len(manifest["texts"]):
                raise ValueError("features and manifest disagree")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            logger.warning("gallery index %s is unreadable (%s): rebuilding it", self.index, err)
            return
        self.names, self.texts, self._entries = manifest["names"], manifest["texts"], manifest["entries"]
        self.unreadable = {name: e["unreadable"] for name, e in self._entries.items() if "unreadable" in e}
        self.image_features, self.text_features = images, texts

    def _save_index(self) -> None:
        tensors = {"images": self.image_features, "texts": self.text_features}
        write_safetensors(self.index / "features.safetensors", tensors)
        manifest = {"format": FORMAT, "model": self.fingerprint, "names": self.names, "texts": self.texts,
                    "entries": self._entries}
        text = json.dumps(manifest, indent=1)
        atomic_write(self.index / "manifest.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _ranked(items: list[str], scores: Tensor, itc: Tensor, top: int) -> list[Hit]:
    order = scores.argsort(descending=True)[:top].tolist()
    return [Hit(items[i], float(scores[i]), float(itc[i])) for i in order]
