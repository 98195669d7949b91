"""`gentrain data build`: the CLI front of the shard writer (wired into the CLI by launch/)."""
from __future__ import annotations

import argparse
import json
import os
import re
import time

from ..errors import GentrainError
from .writer import INDEX_NAME


def parse_bytes(text: str) -> int:
    """'100MB', '1.5G', '4096' -> bytes (powers of 1000; KiB/MiB/GiB are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB, 1GiB or 65536")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_kmgt".index(m.group(2).lower() or "_"))


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, metavar="SOURCE",
                        help="what to write: digits (scikit-learn's 1,797 handwritten digits, captioned), shapes "
                             "(procedural coloured shapes with compositional captions), toy2d (2-D points), "
                             "folder:PATH (images with a sidecar NAME.txt or a captions.jsonl/.csv of file,caption) "
                             "or jsonl:PATH (lines of {\"image\": path, \"caption\": text, ...})")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: shards 000000.tar, 000001.tar, ... and index.json")
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help="image side in pixels for digits (default 32, upscaled from 8) and shapes (default 64)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="number of samples (shapes/toy2d: default 10000; digits: at most 1797; "
                             "folder/jsonl: the first N)")
    parser.add_argument("--split", default="all", choices=("all", "train", "test"),
                        help="digits: all 1,797, train (the first 1,500) or test (the last 297, held out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of captions (digits), scenes (shapes), points (toy2d)")
    parser.add_argument("--toy2d-dist", default="checkerboard", choices=("checkerboard", "8gaussians", "moons"),
                        help="distribution of --source toy2d")
    parser.add_argument("--missing-caption", default="error", choices=("error", "skip", "empty"),
                        help="folder source: an image without a caption stops the build (error), is left out (skip) "
                             "or gets an empty caption (empty)")
    parser.add_argument("--shard-samples", type=int, default=1000, metavar="N",
                        help="at most N samples per shard (default 1000)")
    parser.add_argument("--shard-bytes", type=parse_bytes, default=None, metavar="SIZE",
                        help="also start a new shard before one would exceed SIZE (e.g. 500MB, 1GiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing shard set in --out (otherwise an existing index.json stops the build)")


def run_build(args: argparse.Namespace) -> int:
    """Build a shard set; prints a one-line JSON summary. Returns the exit status."""
    from .sources import build_source, parse_source

    parse_source(args.source)  # a bad spec fails before anything is written
    index_path = os.path.join(args.out, INDEX_NAME)
    if os.path.exists(index_path):
        if not args.overwrite:
            raise GentrainError(f"{args.out} already holds a shard set ({INDEX_NAME}); pass --overwrite to replace it")
        with open(index_path) as f:  # remove only what the old index lists
            for shard in json.load(f).get("shards", []):
                path = os.path.join(args.out, os.path.basename(shard["name"]))
                if os.path.exists(path):
                    os.unlink(path)
        os.unlink(index_path)
    t0 = time.time()
    index = build_source(args.source, args.out, size=args.size, count=args.count, seed=args.seed, split=args.split,
                         toy2d_dist=args.toy2d_dist, missing_caption=args.missing_caption,
                         max_samples=args.shard_samples, max_bytes=args.shard_bytes)
    print(json.dumps({"out": args.out, "source": args.source, "samples": index["samples"],
                      "shards": len(index["shards"]), "image_sizes": index["image_sizes"],
                      "seconds": round(time.time() - t0, 2)}))
    return 0
