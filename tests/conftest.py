import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT ops: built once into the venv (`make test` builds them first), found by every launch
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# offline, as every CLI process is (huggingface_hub reads this at import: set it before anything imports it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    # PYTHONFAULTHANDLER: a process killed by a fatal signal (SIGABRT, SIGSEGV) prints every thread's
    # Python stack, so a rare crash in a launched rank says where it happened
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1",
               **extra)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path | None = None,
            module: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m gentrain ARGS` in a process of its own; returns the completed process. With the
    default environment the process is forked from a server that has the libraries imported
    (cli_fork.py: ~6 s less a call); `module=False` runs ARGS as a command."""
    if module and env is None and os.environ.get("GENTRAIN_TEST_FRESH") != "1":
        import cli_fork

        return cli_fork.run(list(args), cli_env(), cwd or REPO, timeout)
    cmd = [sys.executable, "-m", "gentrain", *args] if module else list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or cli_env(),
                          cwd=cwd or REPO)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


_SALIENT = re.compile(r"error|exception|traceback|terminate|abort|signal|fatal|killed|fault|file \"", re.I)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`r` exited 0; else fail with what tells why, in full (pytest cuts a long assert message): the
    salient stderr lines of every rank (errors, tracebacks, fatal-signal stacks), then the tails."""
    if r.returncode != 0:
        err = r.stderr.splitlines()
        salient = [line for line in err if _SALIENT.search(line) and "Warning" not in line][:80]
        pytest.fail(f"exit {r.returncode}: {' '.join(map(str, r.args))[:600]}\n--- salient stderr lines ---\n"
                    + "\n".join(salient) + "\n--- stdout tail ---\n" + r.stdout[-1500:]
                    + "\n--- stderr tail ---\n" + "\n".join(err[-60:]), pytrace=False)
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_splits(tmp_path_factory, source: str):
    """A built-in digits source at 16 px as train (1,500) and test (297) shard sets."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp(f"{source}16")
    for split in ("train", "test"):
        build_source(source, str(root / split), size=16, split=split)
    return root


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    """scikit-learn's digits at 16 px as train (1,500) and test (297) shard sets."""
    return digit_splits(tmp_path_factory, "digits")


def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_here(preset: str, root: Path, name: str, *over: str, stop_at: int | None = None, resume: bool = False):
    """`gentrain train PRESET OVER... run.output_dir=ROOT run.name=NAME [--stop-at N] [--resume auto]`
    in this process (no interpreter start per run); returns the Trainer."""
    from gentrain.config import load_config
    from gentrain import checkpoint as ckpt
    from gentrain.train.loop import Trainer

    reset_accelerate_state()
    cfg = load_config(preset, [*over, f"run.output_dir={root}", f"run.name={name}"])
    last = ckpt.find_resume_checkpoint(Path(root) / name / "checkpoints") if resume else None
    trainer = Trainer(cfg, Path(root) / name, resume_from=last)
    trainer.train(stop_at=stop_at)
    reset_accelerate_state()
    return trainer


@pytest.fixture
def fresh_accelerate_state():
    """Let a test build its own Accelerator in-process (accelerate keeps process-wide singletons)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_tiny_clip(path: Path, hidden: int = 32) -> Path:
    """A tiny CLIPTextModel + CLIPTokenizer saved as a transformers folder, built offline: the byte-level
    alphabet as the vocabulary (every character its own token, no merges)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    import torch

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


def make_tiny_vae(path: Path, channels: int, widths: tuple, size: int, scaling_factor: float) -> Path:
    """A tiny untrained diffusers AutoencoderKL (len(widths) levels: f = 2**(levels-1)), saved as a folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(widths)
    AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                  up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(widths), latent_channels=4,
                  norm_num_groups=8, sample_size=size, scaling_factor=scaling_factor).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def t2i_stack(tmp_path_factory):
    """16-px digits shards (digits/) cached through a tiny AutoencoderKL (vae/: posterior mean + logvar)
    and a tiny CLIP (clip/) as cached/: built once per session (the DDP parity and FSDP2 tests share it)."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("t2i_stack")
    build_source("digits", str(root / "digits"), size=16, count=96, max_samples=40)
    make_tiny_vae(root / "vae", 1, (8, 16, 16), 16, 0.7)
    make_tiny_clip(root / "clip")
    r = run_cli("data", "cache", "--shards", str(root / "digits"), "--out", str(root / "cached"), "--autoencoder",
                str(root / "vae"), "--text-encoder", str(root / "clip"), "--image-size", "16", "--channels", "1",
                "--max-length", "16", timeout=300)
    ok(r)
    return root


def make_tiny_sd_pipeline(path: Path, prediction_type: str = "v_prediction", flow: bool = False) -> Path:
    """A tiny untrained StableDiffusionPipeline folder on 16-px grey images (f2 AutoencoderKL, tiny CLIP,
    UNet [16, 32]); a DDIM scheduler on SD's scaled-linear betas, or the flow scheduler gentrain's flow
    exports carry."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer

    clip, vae = make_tiny_clip(path / "parts" / "clip"), make_tiny_vae(path / "parts" / "vae", 1, (8, 16), 16, 1.0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    tokenizer = CLIPTokenizer.from_pretrained(str(clip))
    tokenizer.model_max_length = 16
    if flow:
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                final_sigmas_type="zero", solver_order=1, steps_offset=1)
    else:
        scheduler = DDIMScheduler(prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False, steps_offset=1, timestep_spacing="trailing")
    StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(str(vae)), text_encoder=CLIPTextModel.from_pretrained(str(clip)),
                            tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(str(path / "pipe"))
    return path / "pipe"
