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

The folder may change while it is served, by anyone who can write to it. Every file is read
through :meth:`Gallery.open_file`, which lets through only regular files that lie, resolved,
inside the folder; a file gone or refused is skipped (at a refresh: counted as unreadable, with
why; at a search: dropped from the candidates). Messages name files by their name in the folder,
never by the server's path, since they reach clients.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import Image
from torch import Tensor

from qformer.checkpoint import atomic_write, read_safetensors, write_safetensors
from qformer.data.image_files import IMAGE_SUFFIXES, batches
from qformer.data.transforms import eval_image, load_image
from qformer.models.blip2 import expand_key_values
from qformer.pretrained.stage1 import Blip2Stage1, extract_features, image_embeds_of, tokenize
from qformer.retrieval import itm_match_logits

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
        self.root = self.folder.resolve()  # what a file must lie inside, resolved, to be read
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
        """What changes when images are added, removed or rewritten (or the texts change). An
        entry that cannot be stat'ed (gone since the scan listed it, a link to nowhere or to
        itself) is left out: the folder is read as it is, and the next refresh sees it again."""
        entries = []
        with os.scandir(self.folder) as scan:
            for entry in scan:
                if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES and entry.name != TEXTS_FILE:
                    continue
                try:
                    if not entry.is_file():
                        continue
                    status = entry.stat()
                except OSError:
                    continue
                entries.append((entry.name, status.st_size, status.st_mtime_ns))
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
        into it) and texts.txt's (None while there is none): two stats, where :meth:`signature`
        stats every file."""
        try:
            texts = (self.folder / TEXTS_FILE).stat().st_mtime_ns
        except OSError:
            texts = None
        return self.folder.stat().st_mtime_ns, texts

    def refresh_if_changed(self) -> None:
        """Refresh when files came, went or were renamed in, or texts.txt changed (each search
        calls this: two stats, not a scan of a folder of any size)."""
        if self.folder_times() != self._folder_times:
            self.refresh()

    @torch.no_grad()
    def search_text(self, text: str, top: int, k: int) -> list[Hit]:
        """The gallery's images that best match ``text``. The ``k`` candidates are the best by
        ITC among the images still readable now: one gone (or refused) since it was indexed is
        passed over for the next, so a folder changing under a search costs it nothing but
        those images (no readable candidate at all: no results)."""
        if not self.names:
            raise ValueError(f"the gallery holds no readable image ({len(self.unreadable)} unreadable)")
        input_ids, attention_mask = tokenize(self.model, [text])
        query = extract_features(self.model, input_ids=input_ids, attention_mask=attention_mask).text.float().cpu()
        itc = self.model.similarity(self.image_features, query)[:, 0]  # (N,)
        rows, pixels = self._candidates(itc.argsort(descending=True).tolist(), k)
        if not rows:
            return []
        embeds = image_embeds_of(self.model, torch.stack(pixels))
        kv = self.model.qformer.encoder_key_values(embeds)
        itm = itm_match_logits(self.model, kv, input_ids.expand(len(rows), -1), attention_mask.expand(len(rows), -1))
        itc_top = itc[rows]
        return _ranked([self.names[row] for row in rows], itm.float().cpu() + itc_top, itc_top, top)

    @torch.no_grad()
    def search_image(self, image: Image.Image, top: int, k: int) -> list[Hit]:
        """The gallery's texts that best match ``image``."""
        if not self.texts:
            raise ValueError(f"the gallery has no {TEXTS_FILE} (or an empty one): nothing for an image to search")
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

    def open_file(self, name: str) -> BinaryIO:
        """The folder's file ``name``, open for reading, if it is now a regular file that lies,
        resolved, inside the folder; otherwise ValueError naming it (by its name only).

        The file is opened first and checked after, through what was opened: ``fstat`` of the
        descriptor must say a regular file, and the path must now resolve inside the folder to
        that same file (device and inode). Checking the path before opening it would leave a
        window in which a link to a file outside could be renamed over it; this way a swap at
        any moment either fails the check or leaves the descriptor on the file that passed it,
        and every byte read comes from the descriptor. O_NONBLOCK keeps a FIFO put in an image's
        place from blocking the open (it is then refused as not a regular file), O_NOCTTY keeps
        a terminal from becoming the server's."""
        if name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise ValueError(f"{name!r} is not the name of a file in the gallery")
        return open_inside(self.root, self.root / name, name, "the gallery")

    def _pixels(self, name: str) -> Tensor:
        """The image ``name`` preprocessed for the model (3, S, S), read through :meth:`open_file`;
        ValueError naming it when it cannot be."""
        with self.open_file(name) as file:
            try:
                return eval_image(load_image(file), self.model.config.image)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None

    def _candidates(self, order: list[int], k: int) -> tuple[list[int], list[Tensor]]:
        """The first ``k`` rows of ``order`` whose images can be read now, and their pixels."""
        rows, pixels = [], []
        for row in order:
            if len(rows) == k:
                break
            try:
                pixels.append(self._pixels(self.names[row]))
            except ValueError as err:
                logger.info("gallery: %s: left out of this search", err)
                continue
            rows.append(row)
        return rows, pixels

    def _read(self, names: list[str], unreadable: dict[str, str]) -> tuple[list[str], Tensor | None]:
        """The readable ``names`` and their pixels; each unreadable one noted with why."""
        kept, pixels = [], []
        for name in names:
            try:
                pixels.append(self._pixels(name))
            except ValueError as err:
                unreadable[name] = str(err)
                logger.warning("gallery: %s", err)
                continue
            kept.append(name)
        return kept, (torch.stack(pixels) if pixels else None)

    def _refresh_texts(self) -> None:
        """The texts from texts.txt, read through :meth:`open_file`: none while there is no such
        file, or it is refused or not UTF-8 (said in the log), rather than failing the refresh."""
        lines: list[str] = []
        if os.path.lexists(self.folder / TEXTS_FILE):
            try:
                with self.open_file(TEXTS_FILE) as file:
                    lines = file.read().decode("utf-8").splitlines()
            except ValueError as err:  # UnicodeDecodeError is one
                logger.warning("gallery: %s: no texts to search", err)
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


def open_inside(root: Path, path: Path, shown: str, place: str) -> BinaryIO:
    """The file at ``path``, open for reading, if it is a regular file that lies, resolved,
    inside ``root`` (itself resolved); otherwise ValueError naming it as ``shown``, and the
    folder as ``place`` (never the server's paths). :meth:`Gallery.open_file` says why it is
    opened first and checked after."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"{shown}: gone from {place}") from None
    except OSError as err:
        raise ValueError(f"{shown}: {err.strerror}") from None
    file = os.fdopen(descriptor, "rb")
    try:
        opened = os.fstat(descriptor)
        if not stat.S_ISREG(opened.st_mode):
            raise ValueError(f"{shown}: not a regular file")
        try:
            resolved = path.resolve(strict=True)
            now = resolved.stat()
        except OSError:
            raise ValueError(f"{shown}: gone from {place}") from None
        if not resolved.is_relative_to(root):
            raise ValueError(f"{shown}: a link to a file outside {place} folder")
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise ValueError(f"{shown}: replaced while it was opened")
    except BaseException:
        file.close()
        raise
    return file
