"""Typed run configs: YAML presets + dotted overrides -> validated dataclasses.

A config has five sections: ``model`` (its schema is picked by ``model.family``), ``data``,
``train``, ``run`` and ``eval``. Loading is OmegaConf structured merging, so an unknown key, a
wrong type or a missing value is caught before anything heavy starts; the remaining rules (choices,
combinations) are checked by :func:`validate`. Every failure is a one-line :class:`GentrainError`
naming the key, the value and what is allowed. YAML is parsed safely and no value runs code.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gentrain.data_pipeline.config import DataConfig, batch_split_error, dataset_names
from gentrain.distributed.defaults import DDP_DEFAULTS
from gentrain.errors import GentrainError

PRESET_DIR = Path(__file__).parent / "launch" / "presets"   # shipped with the launcher


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 256            # per process, per micro-step
    grad_accum: int = 1              # micro-steps per optimizer step
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    lr_schedule: str = "constant"    # diffusers.optimization names: constant, cosine, linear, ...
    warmup_steps: int = 0            # linear warmup from 0 (with lr_schedule constant too: constant after it)
    max_grad_norm: float = 1.0       # 0 disables clipping (the norm is still computed for the NaN guard)
    mixed_precision: str = "no"      # no | bf16 | fp16 (fp16 needs a GPU)
    seed: int = 0
    ema_decay: float = 0.0           # 0 = no EMA; else diffusers EMAModel with this max decay
    ema_warmup: bool = True          # EMAModel's warmup schedule of the decay
    ema: str = "fixed"               # fixed (train.ema_decay) | posthoc: EDM2 power-function profiles (docs/posthoc-ema.md)
    posthoc_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])  # the stored profiles' lengths
    posthoc_snapshot_every: int = 500  # posthoc: all profiles to RUN/ema_snapshots/ every N steps (and at max_steps)
    nan_patience: int = 5            # abort after this many non-finite steps in a row
    log_every: int = 10
    sample_every: int = 500          # preview grid every N steps (0 = only at the end)
    checkpoint_every: int = 500      # 0 = only at the end
    keep_last: int = 3
    num_processes: int = 0           # expected process count; 0 = don't check (the launch guard)
    process_group_timeout_s: int = 180
    # DDP's gradient all-reduce (ignored by one process; DeepSpeed has its own, refused there)
    ddp_bucket_mb: int = DDP_DEFAULTS["ddp_bucket_mb"]          # gradient bucket size (torch's default)
    ddp_bucket_view: bool = DDP_DEFAULTS["ddp_bucket_view"]    # gradients as views into the buckets (no copy into them each step)
    ddp_comm_hook: str = DDP_DEFAULTS["ddp_comm_hook"]       # no | fp16 | bf16 (CUDA only): gradients all-reduced in 16 bits (torch's compress hooks)
    progress_bar: bool = True
    # fast paths of the step (train/fastpaths.py; measured in bench/step_speed.py, docs/benchmarks.md "Speed")
    compile: str = "no"              # torch.compile the trained nets: no | default | max-autotune-no-cudagraphs | ...
    channels_last: bool = False      # NHWC weights and image batches for the trained conv nets
    fused_optimizer: bool = False    # torch's fused Adam/AdamW kernel (CPU and CUDA)
    allow_tf32: bool = False         # TF32 matmuls and convolutions on CUDA (no effect on CPU)


@dataclass
class RunConfig:
    name: str = MISSING              # defaults to the preset's name
    output_dir: str = "runs"
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class EvalConfig:
    num_samples: int = 2000          # samples for the quality figure (energy distance, FD, ...)
    seed: int = 1234
    shards: Optional[str] = None     # held-out shard set for image metrics (default: the training shards)
    digits: bool = False             # also score with the offline digits evaluator (FD on its features)
    shapes: bool = False             # text-to-image on the shapes source: the analytic colour/shape/position checker
    fd_seeds: int = 3                # digits FD: mean over this many seeds (eval.seed, +1, ...; fresh samples and real sets)


MIXED_PRECISION = ("no", "bf16", "fp16")
COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = ("tensorboard",)
DDP_COMM_HOOKS = ("no", "fp16", "bf16")   # PowerSGD left out: its error-feedback state is not checkpointed


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _find_config(name_or_path: str) -> tuple[Path, str]:
    """A path to a YAML file, or the name of a shipped preset."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise GentrainError(f"config file {name_or_path!r} does not exist")
        return p, p.stem
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise GentrainError(f"no preset named {name_or_path!r} and no such file; presets: {', '.join(list_presets())}")
    return preset, name_or_path


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GentrainError(f"config file {str(path)!r}{where}: malformed YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GentrainError(f"config file {str(path)!r}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def _parse_overrides(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
            raise GentrainError(f"override {item!r}: expected key=value with a dotted key, e.g. train.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GentrainError(f"override {item!r}: {part!r} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0].strip()
    if "Key '" in msg and "not in" in msg:
        m = re.search(r"Key '([^']+)'", msg)
        leaf = m.group(1) if m else key
        return f"config key {key or leaf!r} is not a known key"
    return f"config key {key!r}: {msg}" if key else msg


@dataclass
class Config:
    model: Any
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(name_or_path: str, overrides: list[str] | None = None, *, check_unused: bool = True) -> Config:
    """Resolve a preset name or YAML path plus ``key=value`` overrides into a validated Config
    (``check_unused``: refuse a changed train.* key that the family does not use; off for saved runs)."""
    from gentrain.objectives import family_config

    path, default_name = _find_config(name_or_path)
    raw = _deep_merge(_read_yaml(path), _parse_overrides(overrides or []))
    for section in raw:
        if section not in Config.__dataclass_fields__:
            raise GentrainError(f"config key {section!r} is not a known section; sections: "
                                f"{', '.join(Config.__dataclass_fields__)}")
    model = raw.get("model")
    if not isinstance(model, dict) or "family" not in model:
        raise GentrainError("config key 'model.family' is missing; it picks the objective")
    model_schema = family_config(model["family"])  # raises GentrainError on an unknown family
    schema = OmegaConf.structured(Config(model=model_schema()))
    try:
        merged: DictConfig = OmegaConf.merge(schema, OmegaConf.create(raw))
        if OmegaConf.is_missing(merged.run, "name"):
            merged.run.name = default_name
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise GentrainError(f"config key {missing[0]!r} is required and has no value")
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise GentrainError(_omegaconf_message(e)) from None
    validate(cfg)
    if check_unused:
        from gentrain.objectives.replaced_keys import check_train_keys_apply

        check_train_keys_apply(cfg, TrainConfig())
    return cfg


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise GentrainError(f"config key {key!r}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise GentrainError(f"config key {key!r}: {value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")


def validate(cfg: Config, *, cuda_available: Optional[bool] = None) -> None:
    """Choices and combinations that the schema's types cannot express."""
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "nan_patience", "log_every", "keep_last",
                "process_group_timeout_s"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.lr", t.lr)
    for key in ("weight_decay", "max_grad_norm", "warmup_steps", "sample_every", "checkpoint_every",
                "num_processes"):
        _positive(f"train.{key}", getattr(t, key), zero_ok=True)
    if not 0.0 <= t.ema_decay < 1.0:
        raise GentrainError(f"config key 'train.ema_decay': {t.ema_decay!r} must be in [0, 1)")
    check_posthoc(t)
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise GentrainError(f"config key 'train.betas': {t.betas!r} must be two numbers in [0, 1)")
    if t.mixed_precision == "False":   # YAML 1.1 reads a bare `no` (file or key=value) as false
        t.mixed_precision = "no"
    _choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    t.compile = {"False": "no", "True": "default"}.get(t.compile, t.compile)   # YAML's bare no / yes
    _choice("train.compile", t.compile, COMPILE_MODES)
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    t.ddp_comm_hook = {"False": "no"}.get(t.ddp_comm_hook, t.ddp_comm_hook)
    _choice("train.ddp_comm_hook", t.ddp_comm_hook, DDP_COMM_HOOKS)
    _positive("train.ddp_bucket_mb", t.ddp_bucket_mb)
    for tracker in cfg.run.trackers:
        _choice("run.trackers", tracker, TRACKERS)
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if t.ddp_comm_hook == "bf16" and not cuda_available:
        raise GentrainError("config key 'train.ddp_comm_hook': 'bf16' needs a CUDA GPU (torch's bf16 compress hook "
                            "runs on NCCL only); use 'fp16' with gloo on CPU")
    if t.mixed_precision == "fp16" and not cuda_available:
        raise GentrainError("config key 'train.mixed_precision': 'fp16' needs a CUDA GPU and none is visible "
                            "(accelerate would silently train in fp32); use 'bf16' or 'no' on CPU")
    if not re.fullmatch(r"[\w.\-]+", cfg.run.name):
        raise GentrainError(f"config key 'run.name': {cfg.run.name!r} may hold only letters, digits, '.', '_' and '-'")
    d = cfg.data
    from gentrain.data_pipeline.build import SOURCES

    _choice("data.source", d.source, SOURCES)
    _choice("data.mode", d.mode, ("epoch", "resampled"))
    _choice("data.bad_sample_policy", d.bad_sample_policy, ("skip", "fail"))
    _choice("data.channels", d.channels, (1, 3))
    _positive("data.num_workers", d.num_workers, zero_ok=True)
    if d.prefetch < -1:
        raise GentrainError(f"config key 'data.prefetch': {d.prefetch} must be -1 (auto), 0 (off) or a number of batches")
    if d.source == "toy2d":
        from gentrain.data_pipeline.toy2d import TOY2D

        _choice("data.toy2d", d.toy2d, TOY2D)
    if d.datasets:
        check_datasets(d)
    elif d.source == "shards" and not d.shards:
        raise GentrainError("config key 'data.shards' is required when data.source is 'shards'")
    if d.source == "shards" and not d.aspect_buckets and t.batch_size % max(1, d.num_workers):
        raise GentrainError(batch_split_error(t.batch_size, d.num_workers))
    for key, spec in [("data.shards", d.shards), *((f"data.datasets[{i}].shards", ds.shards)
                                                     for i, ds in enumerate(d.datasets))]:
        if spec and spec.startswith("pipe:") and not d.allow_pipe:
            raise GentrainError(f"config key '{key}': {spec!r} is a pipe: URL, which runs a shell command; "
                                "set data.allow_pipe=true to allow it")
    cfg.model.validate(cfg)  # the family's own rules


def check_posthoc(t: TrainConfig) -> None:
    """train.ema and the post-hoc EMA's keys (gentrain/train/ema.py)."""
    from gentrain.maths.posthoc_ema import SIGMA_REL_MAX

    _choice("train.ema", t.ema, ("fixed", "posthoc"))
    s = list(t.posthoc_sigma_rels)
    if not s or len(set(s)) != len(s) or not all(0 < x < SIGMA_REL_MAX for x in s):
        raise GentrainError(f"config key 'train.posthoc_sigma_rels': {s!r} must be distinct numbers in "
                            f"(0, {SIGMA_REL_MAX:.4f}) (EDM2's sigma_rel; default [0.05, 0.1])")
    _positive("train.posthoc_snapshot_every", t.posthoc_snapshot_every)
    d = TrainConfig()
    for key in ("posthoc_sigma_rels", "posthoc_snapshot_every"):
        if t.ema == "fixed" and getattr(t, key) != getattr(d, key):
            raise GentrainError(f"config key 'train.{key}' does nothing with train.ema=fixed; set train.ema=posthoc too")
    if t.ema == "posthoc" and t.ema_decay:
        raise GentrainError(f"config key 'train.ema_decay': {t.ema_decay!r} is the fixed EMA's decay; with "
                            "train.ema=posthoc the lengths are train.posthoc_sigma_rels: set train.ema_decay=0")


def check_datasets(d: Any) -> None:
    """data.datasets (weighted mixing): each entry's keys, and what cannot combine with it."""
    if d.source != "shards" or d.shards:
        raise GentrainError("config key 'data.datasets': give either data.shards or data.datasets (with "
                            f"data.source 'shards'), not both (data.source {d.source!r}, data.shards {d.shards!r})")
    if d.aspect_buckets:
        raise GentrainError("config key 'data.datasets': aspect buckets (data.aspect_buckets) do not mix: a batch "
                            "takes every dataset's share at one size")
    seen = set()
    for i, (ds, name) in enumerate(zip(d.datasets, dataset_names(d))):
        key = f"data.datasets[{i}]"
        if not ds.shards:
            raise GentrainError(f"config key '{key}.shards' is required")
        _positive(f"{key}.weight", ds.weight)
        if not re.fullmatch(r"[\w.\-]+", name) or name in seen:
            raise GentrainError(f"config key '{key}.name': {name!r} must be unique and hold only letters, digits, "
                                "'.', '_' and '-'")
        seen.add(name)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(to_yaml(cfg))
