"""``qformer shards``: a caption file (COCO JSON, JSONL, CSV) and its images as webdataset tar
shards in img2dataset's layout, for training from files at web scale. Options only at import;
:mod:`qformer.data.shard_writer` does the work."""

from __future__ import annotations

import argparse
import os

from qformer.data.image_files import MAX_IMAGE_PIXELS

_EPILOG = """\
Writes OUT/00000.tar, 00001.tar, ... (each sample {key}.jpg, {key}.txt: the first caption,
{key}.json: key, image_id, path and every caption), beside each shard NNNNN_stats.json
(img2dataset's counts) and, where pyarrow is installed, NNNNN.parquet (one row per image: key,
status, error_message, caption, path, image_id), then OUT/manifest.json. Each shard takes N
images of the file in order; an image that cannot be read is left out and counted. The same
input gives byte-identical files whatever --workers is.

  qformer shards coco_karpathy_train.json shards/coco --image-root coco/images --samples-per-shard 10000
  qformer train configs/stage1.yaml --data.source shards --data.path 'shards/coco/*.tar'
"""


def add_shards_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shards", help="write a caption file and its images as tar shards (webdataset, img2dataset's layout)",
        description="Write the images of a caption file, with all their captions, as webdataset tar shards in "
                    "parallel, with per-shard stats and a manifest.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", help="the caption file: COCO JSON (.json, official or LAVIS list), .jsonl or .csv")
    parser.add_argument("out", help="the folder to write the shards into (empty, or --overwrite)")
    parser.add_argument("--samples-per-shard", type=int, default=10000, metavar="N",
                        help="images per shard; unreadable ones leave it shorter")
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="the folder the file's image paths are relative to (default: the file's folder)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help=f"processes writing shards (default: one per CPU core, {os.cpu_count()} here)")
    parser.add_argument("--keep-bytes", action="store_true",
                        help="keep PNG and WebP files as they are ({key}.png, {key}.webp) instead of re-encoding "
                             "them to JPEG; JPEGs are always kept as they are, other formats always re-encoded")
    parser.add_argument("--jpeg-quality", type=int, default=95, metavar="Q",
                        help="quality of the JPEGs re-encoded from other formats")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="P",
                        help="an image with more pixels is skipped, as the training readers skip it; 0: no limit")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an OUT that holds files: what an earlier run wrote there is removed first")
    parser.set_defaults(run=shards_command)


def shards_command(args: argparse.Namespace) -> None:
    from qformer.data.shard_writer import describe, write_shards

    summary = write_shards(
        args.dataset, args.out, args.samples_per_shard, image_root=args.image_root,
        workers=(os.cpu_count() or 1) if args.workers is None else args.workers, keep_bytes=args.keep_bytes,
        jpeg_quality=args.jpeg_quality, max_image_pixels=args.max_image_pixels or None, overwrite=args.overwrite)
    print(describe(summary))
