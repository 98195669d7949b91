"""The one launcher: `gentrain {train,sample,export,eval,ema,plan,data,demo,presets}`.

`python -m gentrain ...` and `accelerate launch [...] -m gentrain ...` run the same code; the
config's `model.family` picks the objective. User errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from gentrain.errors import GentrainError

EPILOG_TRAIN = """examples:
  gentrain train flow_toy2d
  gentrain train flow_toy2d train.max_steps=500 data.toy2d=moons run.name=moons
  gentrain train my_config.yaml --dry-run
  gentrain train flow_toy2d --resume auto
  accelerate launch --multi_gpu --num_processes 2 -m gentrain train flow_toy2d train.num_processes=2

signals: on SIGUSR1 or SIGTERM every rank finishes its step, a checkpoint is saved, one line
  'gentrain: stopped by signal ...' is printed and the exit status is 75 (EX_TEMPFAIL: stopped,
  not finished; continue with --resume auto). Exit 0: finished; 2: user error; 130: Ctrl-C.
  SLURM: gentrain/launch/slurm/gentrain.sbatch.
"""


COMMANDS = """commands:
  gentrain train CONFIG [key=value ...]     train from a preset or a YAML config (--dry-run, --resume)
  gentrain sample RUN                       draw samples from a run's newest valid checkpoint
  gentrain export RUN --out DIR             a diffusers folder (pipelines, autoencoders, generators, LoRA)
  gentrain eval RUN                         a run's quality figures as JSON
  gentrain ema RUN --sigma-rel X --out DIR  an EMA of any length from a train.ema=posthoc run (--sweep: eval curve)
  gentrain plan CONFIG --gpus G             per-GPU memory under DDP, ZeRO-1/2/3 and FSDP2 (+ offload)
  gentrain data build --source S --out DIR  WebDataset shards (+ index.json) from a source or your images
  gentrain data index SPEC                  index.json (sample counts) for an existing shard set
  gentrain data cache --shards SPEC ...     encode images and captions once into cached shards
  gentrain demo                             the main job: data, autoencoder, text-to-image, export, evaluate
  gentrain presets                          every shipped preset: family, data, purpose
Each command has --help. Docs: README.md and docs/ in the repository.
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a preset or YAML config",
                       description="Train a model. CONFIG is a shipped preset name (list them with "
                                   "`gentrain presets`) or a YAML file; "
                                   "key=value overrides use dotted keys (train.lr=3e-4).",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="preset name or path to a YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", default="none", metavar="{none,auto,PATH}",
                   help="none: new run (refuses an existing run dir); auto: newest valid checkpoint of the "
                        "run (fresh start if none); PATH: that checkpoint directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved, validated config and exit, writing nothing (with --resume: after the "
                        "same compatibility check a real resume runs)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save a checkpoint at STEP and exit (the LR schedule still spans train.max_steps; "
                        "continue later with --resume auto)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from gentrain.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from gentrain.train.runs import check_run_dir

        # with --resume: the checks a real resume runs, writing nothing
        resume_from = check_run_dir(cfg, args.resume)[1] if args.resume != "none" else None
        print(to_yaml(cfg), end="")
        _print_deepspeed_config(cfg)
        _print_fsdp2_settings(cfg)
        if resume_from is not None:
            print(f"gentrain: --dry-run: would resume from {resume_from}", file=sys.stderr)
        return 0
    from gentrain.outputs import removed_on_failure
    from gentrain.train.loop import Trainer
    from gentrain.train.preflight import check_inputs
    from gentrain.train.runs import prepare_run_dir
    from gentrain.train.stop import EXIT_STOPPED
    from gentrain.distributed.core import is_main_env

    check_inputs(cfg)   # shards, pretrained paths, autoencoder fit: before anything is created
    # a start that fails (a model that does not load or fit) leaves no run directory it created
    with removed_on_failure(Path(cfg.run.output_dir) / cfg.run.name) if is_main_env() else nullcontext():
        run_dir, resume_from = prepare_run_dir(cfg, args.resume, is_main=is_main_env())
        trainer = Trainer(cfg, run_dir, resume_from=resume_from)
    if resume_from is not None and trainer.main:
        print(f"gentrain: resumed from {resume_from} (step {trainer.step})", file=sys.stderr)
    results = trainer.train(stop_at=args.stop_at)
    if trainer.main:
        print(json.dumps({"run_dir": str(run_dir), **results}, indent=1))
    return EXIT_STOPPED if results.get("stopped_by_signal") else 0


def _print_deepspeed_config(cfg) -> None:
    """Under `accelerate launch` with DeepSpeed: the DeepSpeed JSON each engine will get."""
    from gentrain.distributed.ds_config import check_setup, deepspeed_requested, describe, plugin_config, resolve_config

    if not deepspeed_requested():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = resolve_config(plugin_config(), cfg.train, world)
    check_setup(ds, [], None)
    print(f"# DeepSpeed config, resolved for {world} process(es) (one engine per trained phase):")
    print(describe(ds))


def _print_fsdp2_settings(cfg) -> None:
    """Under `accelerate launch` with FSDP: the FSDP2 settings gentrain shards with."""
    from gentrain.distributed.ds_config import deepspeed_requested
    from gentrain.distributed.fsdp2 import describe, fsdp_requested, settings

    if fsdp_requested() and not deepspeed_requested():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"# FSDP2 settings, resolved for {world} process(es) (fully_shard per trained net):")
        print(describe(settings(cfg.train.mixed_precision)))


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained run (EMA weights when kept)",
                       description="Sample from the newest valid checkpoint of a run and write an image "
                                   "(and the raw samples as safetensors).")
    p.add_argument("run", type=Path, help="run directory, e.g. runs/flow_toy2d")
    p.add_argument("-n", "--num", type=int, default=None, help="number of samples (default: the family's preview count)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the config's)")
    p.add_argument("--sampler", default=None, help="sampler name, e.g. euler or heun for flow models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", action="append", default=None,
                   help="text models: a prompt (repeatable; -n samples cycle through them)")
    p.add_argument("--label", type=int, action="append", default=None,
                   help="class-conditional models: a class id (repeatable; -n samples cycle through them)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: model.latent.guidance_scale)")
    p.add_argument("--input", type=Path, action="append", default=None,
                   help="image-to-image models (pix2pix, cyclegan): an input image file (repeatable)")
    p.add_argument("--direction", choices=("ab", "ba"), default=None, help="cyclegan: translate A->B (default) or B->A")
    p.add_argument("--truncation", type=float, default=None,
                   help="stylegan GANs: truncation psi toward the mean style (1 = none; default: model.truncation)")
    p.add_argument("--checkpoint", type=Path, default=None, help="a specific checkpoint directory")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default: RUN/samples/sample_seedS.png)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import torch
    from safetensors.torch import save_file

    from gentrain.outputs import check_out
    from gentrain.train.preview import render
    from gentrain.train.runs import load_trained

    if args.out is not None:
        check_out(args.out, folder=False)
    cfg, objective, path = load_trained(args.run, args.checkpoint, use_ema=not args.no_ema)
    kw = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler), ("guidance_scale", args.guidance),
                            ("truncation", args.truncation)) if v is not None}
    if args.direction:
        kw["direction"] = args.direction
    kind = objective.conditioning.kind
    if kind == "image" or args.input:
        return _sample_image2image(args, cfg, objective, path, kind, kw)
    given = args.prompt or args.label
    if kind == "text" and not args.prompt or kind == "class" and not args.label:
        raise GentrainError(f"{args.run} is a {kind}-conditioned model: pass --{'prompt' if kind == 'text' else 'label'}")
    if kind == "none" and given:
        raise GentrainError(f"{args.run} is unconditional: --prompt/--label do not apply")
    n = args.num or (len(given) if given else objective.preview_count)
    cond = {"prompts" if kind == "text" else "labels": [given[i % len(given)] for i in range(n)]} if given else None
    samples = objective.sample(n, cond, generator=torch.Generator().manual_seed(args.seed), **kw)
    out = args.out or Path(args.run) / "samples" / f"sample_seed{args.seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    captions = [str(c) for c in cond[next(iter(cond))]] if cond else None
    render(samples, captions, nrow=min(n, 10) if cond else None).save(out)
    save_file({"samples": samples.contiguous()}, str(out.with_suffix(".safetensors")))
    print(json.dumps({"checkpoint": str(path), "image": str(out), "samples": str(out.with_suffix(".safetensors")),
                      "shape": list(samples.shape)}))
    return 0


def _read_inputs(files: list[Path], data_cfg):
    from gentrain.data_pipeline.decode import open_image
    from gentrain.data_pipeline.transforms import image_array, images_to_tensor, resize_crop, to_channels

    arrays = []
    for f in files:
        if not f.is_file():
            raise GentrainError(f"--input {f}: no such file")
        try:
            im = to_channels(open_image(f.read_bytes(), data_cfg.max_image_pixels), data_cfg.channels)
        except Exception as e:  # noqa: BLE001 - BadSample or PIL's errors: one line naming the file
            raise GentrainError(f"--input {f}: not a readable image ({str(e).splitlines()[0]})") from None
        arrays.append(image_array(resize_crop(im, data_cfg.image_size, data_cfg.image_size, None), flip=False))
    return images_to_tensor(arrays)


def _sample_image2image(args, cfg, objective, path, kind: str, kw: dict) -> int:
    import torch
    from safetensors.torch import save_file

    from gentrain.train.preview import render

    if kind != "image":
        raise GentrainError(f"{args.run} does not translate images: --input does not apply")
    if not args.input:
        raise GentrainError(f"{args.run} is an image-to-image model: pass --input IMAGE (repeatable)")
    x = _read_inputs(args.input, cfg.data)
    out_images = objective.sample(len(x), {"input": x}, **kw)
    out = args.out or Path(args.run) / "samples" / "translated.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    render(torch.cat([x, out_images]), nrow=len(x)).save(out)  # rows: inputs, outputs
    save_file({"samples": out_images.contiguous()}, str(out.with_suffix(".safetensors")))
    print(json.dumps({"checkpoint": str(path), "image": str(out), "samples": str(out.with_suffix(".safetensors")),
                      "shape": list(out_images.shape)}))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained run's weights",
                       description="Export the newest valid checkpoint of a run (EMA weights when kept).")
    p.add_argument("run", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from gentrain.outputs import check_out, removed_on_failure
    from gentrain.train.export import export_run

    check_out(args.out)
    with removed_on_failure(args.out):
        out = export_run(args.run, args.out, checkpoint=args.checkpoint)
    print(json.dumps({"exported": str(out)}))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure a trained run's quality figures (JSON)",
                       description="Compute the run's offline quality metrics from its newest valid checkpoint "
                                   "(toy2d: energy distance to the true distribution, beside real-vs-real).")
    p.add_argument("run", type=Path)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--num-samples", type=int, default=None, help="override eval.num_samples")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from gentrain.eval.metrics import evaluate
    from gentrain.train.runs import load_trained

    cfg, objective, path = load_trained(args.run, args.checkpoint)
    if args.num_samples:
        cfg.eval.num_samples = args.num_samples
    results = evaluate(objective, cfg)
    print(json.dumps({"checkpoint": str(path), **results}, indent=1))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build: shards from a source; index: index.json for a shard set; cache: latents "
                                    "and caption embeddings",
                       description="Data preparation: `gentrain data build --help`, `gentrain data index --help`, "
                                   "`gentrain data cache --help`.")
    dsub = p.add_subparsers(dest="data_command", metavar="{build,index,cache}", required=True)
    from gentrain.launch import data_commands as commands

    b = dsub.add_parser("build", help="write WebDataset tar shards (+ index.json) from a source",
                        description="Write WebDataset tar shards with an index.json from a built-in source "
                                    "(digits, shapes, toy2d, edges2digits, digits_inverted) or your images "
                                    "(folder:PATH, jsonl:PATH).")
    commands.add_build_arguments(b)
    b.set_defaults(func=commands.run_build)
    i = dsub.add_parser("index", help="write index.json (sample counts per shard) for an existing shard set",
                        description="Count the samples of every shard of SPEC (a folder, a brace pattern or a list; "
                                    "local or s3://) across worker processes and write index.json beside them, so "
                                    "no training run has to scan. img2dataset folders need none (their stats files "
                                    "hold the counts), but it makes their start one read.")
    commands.add_index_arguments(i)
    i.set_defaults(func=commands.run_index)
    c = dsub.add_parser("cache", help="encode images (frozen autoencoder) and captions (frozen text encoder) once "
                                      "into new shards",
                        description="Cache VAE posteriors (mean, logvar) and caption embeddings + attention masks "
                                    "as latent.npy / emb.npy / mask.npy shards that trainers read transparently (with "
                                    "--pretrained PIPELINE: every encoder output a fine-tune of it needs; it loads no "
                                    "T5). Runs on N processes under `accelerate launch -m gentrain data cache ...`.")
    commands.add_cache_arguments(c)
    c.set_defaults(func=commands.run_cache)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the README's main job: data, autoencoder, text-to-image, export, evaluate",
                       description="Build digits shards, train the autoencoder (vae_digits), train text-conditioned "
                                   "latent flow matching (t2i_flow_digits), export a StableDiffusionPipeline, reload "
                                   "it with stock diffusers in a fresh process, sample and print the quality figures. "
                                   "--toy runs the 2-D flow matching demo instead.")
    p.add_argument("--out", default="runs", help="output directory for data and runs (default: runs)")
    p.add_argument("--steps", type=int, default=None, help="text-to-image (or --toy) training steps (default: the preset's)")
    p.add_argument("--resume", default="auto", metavar="{none,auto}", help="continue previous demo runs (default: auto)")
    p.add_argument("--objective", choices=("flow", "ddpm"), default="flow",
                   help="text-to-image objective: latent flow matching (t2i_flow_digits, default) or latent "
                        "DDPM with DDIM sampling (t2i_ddpm_digits)")
    p.add_argument("--toy", action="store_true", help="the 2-D flow matching demo (1 minute)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from gentrain.outputs import check_out
    from gentrain.launch.demo import run_demo

    check_out(args.out)
    return run_demo(out=args.out, steps=args.steps, resume=args.resume, toy=args.toy, objective=args.objective)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-GPU memory of a config under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 (+ offload)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Per-GPU memory of training CONFIG on GPUS x NODES data-parallel ranks: trained params, grads, "
                    "Adam state, fp32 master, EMA (train.ema=posthoc: a copy per profile; its snapshots' disk in a "
                    "note), frozen helpers (autoencoder, text encoder), comm buffers, and activations measured by a "
                    "real forward + backward on CPU at small batches, scaled linearly to train.batch_size. Columns: "
                    "DDP, ZeRO-1/2/3, ZeRO-3+offload, FSDP2 (+offload). No downloads: hub parts from configs (fine-tunes: never run).",
        epilog="examples:\n  gentrain plan t2i_flow_digits --gpus 8 --nodes 2\n  gentrain plan finetune_sdxl_lora --gpus 8\n"
               "  gentrain plan ldm_t2i_256 train.batch_size=64 --gpus 8 --gpu-memory 80GB --json")
    p.add_argument("config", help="preset name or path to a YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides right after CONFIG, e.g. train.batch_size=64")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1); data-parallel size = gpus x nodes")
    p.add_argument("--gpu-memory", default="80GB", metavar="SIZE",
                   help="memory of one GPU, e.g. 80GB, 40GiB, 24G (GB = GiB, as GPU makers count; default 80GB)")
    p.add_argument("--margin", type=float, default=0.10,
                   help="fraction of --gpu-memory kept free for the CUDA context and fragmentation (default 0.10)")
    p.add_argument("--measure-batches", default="auto", metavar="auto|B1,B2",
                   help="batch sizes of the CPU activation measurement; the last two fix the per-sample line "
                        "(default auto: 1, 2 and 4, or 1 alone when batch 1 takes over 15 s)")
    p.add_argument("--no-measure", action="store_true", help="skip the activation measurement (counts only)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.error = lambda message: p.exit(2, f"gentrain: error: {message} (see gentrain plan --help)\n")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from gentrain.launch.plan.memory import run_plan

    return run_plan(args)


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the shipped presets: family, data, one-line purpose",
                       description="Every preset shipped in gentrain/launch/presets/: name, model.family, its data "
                                   "(shards or toy2d source) and its purpose (the first sentence of the file's "
                                   "leading comment). Train one with `gentrain train NAME`.")
    p.add_argument("--family", default=None, help="only the presets of this model.family, e.g. gan")
    p.set_defaults(func=cmd_presets)


def cmd_presets(args) -> int:
    from gentrain.launch.preset_catalog import run_presets

    return run_presets(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gentrain", description="Train generative image models: one launcher for "
                                     "every family (flow, diffusion, vae, vqvae, gan, pix2pix, cyclegan, finetune).",
                                     epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,export,eval,ema,plan,data,demo,presets}",
                                required=True)
    from gentrain.launch.ema_command import add_ema

    for add in (_add_train, _add_sample, _add_export, _add_eval, add_ema, _add_plan, _add_data, _add_demo, _add_presets):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from gentrain.quiet import install

    install()  # known-harmless library messages, dropped by message (quiet.py)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GentrainError as e:
        print(f"gentrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gentrain: interrupted", file=sys.stderr)
        return 130

