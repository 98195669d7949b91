"""The DeepSpeed config of a launch: accelerate's, with every "auto" filled from gentrain's keys.

accelerate reads the DeepSpeed settings (stage, offload, a JSON file) from its config file or
environment; gentrain fills every "auto" from its own ``train.*`` keys (micro-batch, gradient
accumulation, clipping, precision) and refuses an explicit value that disagrees with them, or a
set-up that cannot work (one line each, before any training). Light: importing this module loads
neither accelerate nor DeepSpeed (``gentrain train --dry-run`` prints the resolved config).
"""
from __future__ import annotations

import copy
import json
import os
from collections import Counter
from typing import Any, Callable

from gentrain.errors import GentrainError

# filled from gentrain's config; an explicit different value in the DeepSpeed config is an error
_FILLED = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
           "train_batch_size": "train.batch_size x train.grad_accum x processes",
           "gradient_clipping": "train.max_grad_norm"}


def deepspeed_requested(env: dict | None = None) -> bool:
    """Whether `accelerate launch` (its config file or flags) asked for DeepSpeed."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def plugin_config() -> dict:
    """The DeepSpeed config accelerate's launcher describes (its environment), before gentrain fills it."""
    from accelerate.utils import DeepSpeedPlugin

    try:
        return copy.deepcopy(DeepSpeedPlugin().deepspeed_config)
    except (ValueError, OSError) as e:
        raise GentrainError(f"the DeepSpeed config from accelerate is unusable: {str(e).splitlines()[0]}") from None


def _conflict(key: str, have: Any, want: Any, gkey: str) -> GentrainError:
    return GentrainError(f"the DeepSpeed config sets {key}={have!r} but gentrain's config key '{gkey}' gives {want!r}; "
                         f"leave it 'auto' (gentrain fills it) or change '{gkey}'")


def resolve_config(base: dict, train_cfg: Any, world_size: int) -> dict:
    """accelerate's DeepSpeed config with every 'auto' filled from gentrain's train.* keys."""
    t, cfg = train_cfg, copy.deepcopy(base)
    want = {"train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": t.batch_size * t.grad_accum * world_size, "gradient_clipping": float(t.max_grad_norm)}
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and float(have) != float(value):
            raise _conflict(key, have, value, _FILLED[key])
        cfg[key] = value
    for key in ("bf16", "fp16"):  # train.mixed_precision decides, as it does for DDP
        cfg[key] = {**(cfg.get(key) or {}), "enabled": t.mixed_precision == key}
    zero = cfg.setdefault("zero_optimization", {})
    zero.setdefault("stage", 0)
    for k in [k for k, v in zero.items() if v == "auto"]:
        del zero[k]  # bucket sizes etc.: DeepSpeed's defaults (accelerate sizes them from a HF model's hidden_size)
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict) and zero[section].get("device") in (None, "none"):
            del zero[section]
    opt = cfg.get("optimizer") or cfg.get("scheduler")
    if opt:
        raise GentrainError("the DeepSpeed config names an optimizer or scheduler; gentrain builds them from its train.* "
                            "keys (one per phase): remove them from the DeepSpeed config")
    cfg["zero_allow_untested_optimizer"] = True
    spp = cfg.get("steps_per_print")
    cfg["steps_per_print"] = spp if isinstance(spp, int) else 2**62  # accelerate writes inf, which JSON cannot hold
    cfg["wall_clock_breakdown"] = False
    return cfg


def describe(cfg: dict) -> str:
    return json.dumps(cfg, indent=1, sort_keys=True)


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(cfg: dict) -> bool:
    return (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none") != "none"


def check_setup(cfg: dict, phase_nets: list[tuple[str, ...]], zero_problem: Callable[[int], str | None] | None) -> None:
    """Refuse, before any training, a DeepSpeed set-up that cannot work (one line each; fp16 without
    CUDA is refused by the config's validation already)."""
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise GentrainError(f"the DeepSpeed config's zero_optimization.stage is {stage}: choose 0, 1, 2 or 3")
    zero = cfg["zero_optimization"]
    if "offload_param" in zero and stage != 3:
        raise GentrainError(f"parameter offload (offload_param) needs ZeRO stage 3; this config has stage {stage}")
    problem = zero_problem(stage) if zero_problem else None
    if problem:
        lower = "; use ZeRO stage 2 or below" if stage == 3 and not zero_problem(2) else "; train it with DDP"
        raise GentrainError(f"ZeRO-{stage} cannot train this model: {problem}{lower}")
    counts = Counter(n for nets in phase_nets for n in nets)
    shared = [n for n, c in counts.items() if c > 1]
    if shared:
        raise GentrainError(f"under DeepSpeed a net has one engine and one optimizer: net {shared[0]!r} is trained by "
                            f"{counts[shared[0]]} phases")
    if offloads_optimizer(cfg):
        try:
            from deepspeed.ops.op_builder import CPUAdamBuilder

            CPUAdamBuilder().load()
        except Exception as e:  # noqa: BLE001 - any failure means the op is not there
            raise GentrainError(f"optimizer offload needs DeepSpeed's CPUAdam op, which did not build or load: "
                                f"{str(e).splitlines()[0][:200]}") from None
