"""What the fine-tune tests of the pipeline classes share (test_finetune_{sd3,flux,qwenimage,sana}.py and the
tiny_pipelines_*.py builders): one tiny pipeline folder per class and test session, the runs' common settings, a
digits folder beside it, the objective built from them, and the builders' `python tests/tiny_pipelines_X.py DIR`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

# the settings every tiny fine-tune run shares (each test file adds its class's own)
FINETUNE_COMMON = ["data.channels=1", "data.num_workers=0", "data.random_flip=false", "train.mixed_precision=no",
                   "train.batch_size=4", "train.grad_accum=1", "train.log_every=1", "train.progress_bar=false",
                   "train.warmup_steps=0", "model.sample_steps=2", "model.validation_samples=4",
                   "model.validation_prompts=['a 3']", "run.trackers=[]", "eval.num_samples=4", "train.ema_decay=0"]


def finetune_common(size: int, *extra: str) -> list[str]:
    return [f"data.image_size={size}", *FINETUNE_COMMON, *extra]


def shared_pipeline(tmp_path_factory: Any, name: str, make: Callable[[Path], Path]) -> Path:
    """The session's tiny `name` folder, built by the first test module that asks (under pytest's base temp)."""
    root = tmp_path_factory.getbasetemp() / name
    if not (root / "pipe" / "model_index.json").is_file():
        make(root)
    return root / "pipe"


def digits_beside(tmp_path_factory: Any, name: str, size: int, count: int, pipeline: Path) -> tuple[Path, Path]:
    """A module's folder with `count` digits shards (count // 2 per shard) beside the session's pipeline."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp(name)
    build_source("digits", str(root / "digits"), size=size, count=count, max_samples=count // 2)
    return root, pipeline


def build_finetune(root: Path, pipe: Path, *overrides: str) -> Any:
    """The finetune_t2i_lora objective on `pipe` and the module's digits, with `overrides` (no run, no files)."""
    from gentrain.config import load_config
    from gentrain.objectives import build_objective

    return build_objective(load_config("finetune_t2i_lora", [f"model.pretrained={pipe}",
                                                              f"data.shards={root / 'digits'}", *overrides]))


def draw_once(make: Callable[[Path], Path], folder: str, size: int, **call: Any) -> Any:
    """`python tests/tiny_pipelines_X.py DIR`: build one, load it with its own class, draw two prompts; prints the
    times and the range, returns the pipeline (for the builder's own extra checks)."""
    import time

    import diffusers
    import torch

    t0 = time.time()
    built = make(Path(folder))
    t1 = time.time()
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(built))
    pipe.set_progress_bar_config(disable=True)
    img = pipe(["a 3", "a seven"], num_inference_steps=2, height=size, width=size, output_type="pt",
               generator=torch.Generator().manual_seed(0), **call).images
    print(f"{type(pipe).__name__}: built in {t1 - t0:.1f} s, drew {tuple(img.shape)} in {time.time() - t1:.1f} s, "
          f"range [{float(img.min()):.3f}, {float(img.max()):.3f}]")
    return pipe


def stock_vs_gentrain(script: str, pipe: Path, out: Path, objective: Any, prompts: list[str], steps: int,
                      guidance: float) -> tuple[dict, dict]:
    """What `script` draws per load path with stock diffusers in a fresh process that never imports gentrain (base
    pipeline `pipe`, export `out`; it saves out/fresh.pt and prints the gentrain modules it saw last), and each
    one's max |diff| from gentrain's own drawing (seed 0, the same steps and guidance)."""
    import json
    import subprocess
    import sys

    import torch

    from conftest import cli_env, ok

    mine = (objective.sample(len(prompts), {"prompts": list(prompts)}, generator=torch.Generator().manual_seed(0),
                             steps=steps, guidance_scale=guidance) + 1) / 2
    r = subprocess.run([sys.executable, "-c", script, str(pipe), str(out)], capture_output=True, text=True,
                       timeout=300, env=cli_env())
    ok(r)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []     # stock diffusers, gentrain never imported
    imgs = torch.load(out / "fresh.pt", weights_only=True)
    return imgs, {k: float((v - mine).abs().max()) for k, v in imgs.items()}
