"""`gentrain demo`: the README's main job, end to end on embedded data (scikit-learn's digits):
build shards, train the autoencoder, train a text-conditioned latent flow model, export it,
reload the export with stock diffusers in a fresh process, sample, and print the quality figures.
Each stage is the real CLI in its own process, as a user would run it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

STOCK_SAMPLE = """
import sys, json, torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert "gentrain" not in sys.modules
prompts = json.loads(sys.argv[2])
out = pipe(prompts, num_inference_steps=30, guidance_scale=float(sys.argv[4]), output_type="np",
           generator=torch.Generator().manual_seed(0)).images
save_file({"images": torch.from_numpy(out).permute(0, 3, 1, 2).contiguous() * 2 - 1}, sys.argv[3])
"""


def _run(args: list[str]) -> dict:
    """A gentrain subcommand in a fresh process; its progress goes to this terminal, its JSON back."""
    print(f"\n$ gentrain {' '.join(args)}", file=sys.stderr, flush=True)
    p = subprocess.run([sys.executable, "-m", "gentrain", *args], stdout=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(p.returncode)
    return json.loads(p.stdout[p.stdout.index("{"):]) if "{" in p.stdout else {}


def run_toy_demo(out: str, steps: int | None, resume: str) -> int:
    res = _run(["train", "flow_toy2d", f"run.output_dir={out}", "run.name=demo_flow_toy2d", "--resume", resume,
                *([f"train.max_steps={steps}"] if steps else [])])
    print(f"\ngentrain demo --toy: energy distance to the true checkerboard = {res['eval/energy_distance']:.4f} "
          f"(two real sample sets of the same size: {res['eval/energy_distance_real_vs_real']:.4f})", file=sys.stderr)
    return 0


PRESETS = {"flow": "t2i_flow_digits", "ddpm": "t2i_ddpm_digits"}


def run_demo(out: str = "runs", steps: int | None = None, resume: str = "auto", toy: bool = False,
             objective: str = "flow") -> int:
    if toy:
        return run_toy_demo(out, steps, resume)
    import torch
    from safetensors.torch import load_file

    from gentrain.data_pipeline.sources import DIGIT_WORDS
    from gentrain.eval.digits import default_evaluator
    from gentrain.train.preview import render

    root = Path(out)
    data = root / "demo_data"
    for split in ("train", "test"):
        if not (data / split / "index.json").exists():
            _run(["data", "build", "--source", "digits", "--split", split, "--size", "16", "--out", str(data / split)])
    common = [f"run.output_dir={out}", "train.progress_bar=true"]
    ae = _run(["train", "vae_digits", *common, f"data.shards={data / 'train'}", "run.name=demo_vae", f"eval.shards={data / 'test'}", "--resume", resume])
    ae_export = root / "demo_vae" / "export"
    if ae_export.exists():
        shutil.rmtree(ae_export)
    _run(["export", str(root / "demo_vae"), "--out", str(ae_export)])
    # encode every image and caption once (`gentrain data cache`): the text-to-image steps then cost
    # the UNet alone, ~3.5x faster here, so the same minutes buy ~3x the steps
    cached = root / "demo_vae" / "cached_train"
    if cached.exists():
        shutil.rmtree(cached)
    _run(["data", "cache", "--shards", str(data / "train"), "--out", str(cached), "--autoencoder", str(ae_export),
          "--image-size", "16", "--channels", "1", "--max-length", "16"])
    name = "demo_t2i" if objective == "flow" else f"demo_t2i_{objective}"
    t2i = _run(["train", PRESETS[objective], *common, f"data.shards={cached}", f"run.name={name}", f"model.latent.autoencoder={ae_export}",
                "eval.digits=true", "--resume", resume, *([f"train.max_steps={steps}"] if steps else [])])
    export = root / name / "export"
    if export.exists():
        shutil.rmtree(export)
    _run(["export", str(root / name), "--out", str(export)])

    print("\nreloading the export with stock diffusers in a fresh process ...", file=sys.stderr, flush=True)
    prompts = [f"a handwritten digit {d}" for d in range(10)] + [f"a handwritten digit {DIGIT_WORDS[d]}" for d in range(10)]
    samples = root / name / "stock_samples.safetensors"
    scale = t2i.get("eval/guidance_scale", 3.0)
    subprocess.run([sys.executable, "-c", STOCK_SAMPLE, str(export), json.dumps(prompts), str(samples), str(scale)],
                   check=True)
    images = load_file(str(samples))["images"][:, :1]
    stock_acc = float((default_evaluator(16).predict(images) == torch.arange(20) % 10).float().mean())
    grid = root / name / "stock_samples.png"
    render(images, prompts, nrow=10).save(grid)
    summary = {
        "autoencoder": {"psnr_heldout_db": ae.get("eval/psnr"), "recon_fd": ae.get("eval/recon_fd"),
                        "recon_fd_real_vs_real": ae.get("eval/recon_fd_real_vs_real")},
        "text_to_image": {k.removeprefix("eval/"): v for k, v in t2i.items() if k.startswith("eval/")},
        "stock_diffusers": {"export": str(export), "samples": str(grid), "accuracy_20_prompts": stock_acc},
    }
    print(json.dumps(summary, indent=1))
    r = summary["text_to_image"]
    print(f"\ngentrain demo: conditional accuracy at guidance {scale:g}: {r.get('accuracy_numeral', float('nan')):.3f} "
          f"('a handwritten digit 7'), {r.get('accuracy_word', float('nan')):.3f} ('a handwritten digit seven'); "
          f"digits-classifier FD {r.get('fd', float('nan')):.1f} vs {r.get('fd_real_vs_real', float('nan')):.1f} "
          f"real-vs-real (N={int(r.get('fd_n', 0))}, mean of {int(r.get('fd_seeds', 1))} seeds, not Inception FID); the stock diffusers pipeline reloaded from "
          f"{export} drew {grid} with accuracy {stock_acc:.2f}", file=sys.stderr)
    return 0
