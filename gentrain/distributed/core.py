"""Everything that knows about accelerate / torch.distributed specifics lives here."""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import accelerate.optimizer
from accelerate import Accelerator
from accelerate.utils import convert_outputs_to_fp32, set_seed  # noqa: F401 (set_seed: the Trainer's, re-exported)
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, InitProcessGroupKwargs

from gentrain.distributed.backend import Backend
from gentrain.distributed.defaults import DDP_DEFAULTS
from gentrain.distributed.trackers import make_trackers
from gentrain.errors import GentrainError
from gentrain.quiet import stdout_without

if not torch.cuda.is_available():
    # accelerate imports deepspeed (when installed) to unwrap models; without this, deepspeed
    # probes for an accelerator and prints a warning on stdout, which would corrupt JSON output.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# AcceleratedOptimizer.step asks `is_lomo_available()` twice per step, which probes the installed
# packages through importlib.metadata each time (~0.35 ms a step, 3% of a 10 ms step here). What
# is installed cannot change during a run, so answer from a cache (bench/trainer_overhead.py).
accelerate.optimizer.is_lomo_available = functools.lru_cache(maxsize=None)(accelerate.optimizer.is_lomo_available)


def check_world_size(actual: int, expected: int, env: dict | None = None) -> None:
    """Fail loudly when the launcher started a different number of processes than intended.

    `accelerate launch --cpu --num_processes 2` starts ONE process and leaves WORLD_SIZE unset,
    so the config's expected count (train.num_processes) is the signal that catches it.
    """
    env = os.environ if env is None else env
    world = env.get("WORLD_SIZE")
    if world is not None and int(world) != actual:
        raise GentrainError(f"WORLD_SIZE={world} but accelerate runs {actual} process(es): the launch is inconsistent")
    if expected and expected != actual:
        hint = (" (note: `accelerate launch --cpu --num_processes N` starts one process; on CPU use "
                "`accelerate launch --multi_gpu --num_processes N`)" if actual == 1 else "")
        if "CROSS_SIZE" in env and expected > actual:  # set by DeepSpeed's own launcher, never by torchrun
            hint = (f" (DeepSpeed's launcher started a {env['CROSS_SIZE']}-machine world here: accelerate uses it for "
                    "a --num_machines launch unless the accelerate config sets `deepspeed_multinode_launcher: "
                    "standard` under deepspeed_config, as gentrain's zero*.yaml do)")
        elif env.get("GROUP_WORLD_SIZE", "1") != "1" and expected > actual:  # torchrun: this launch's machines
            hint = (f" ({env['GROUP_WORLD_SIZE']} machine(s) x {env.get('LOCAL_WORLD_SIZE', '?')} process(es) each: "
                    "--num_processes is the total over all machines)")
        raise GentrainError(f"config key 'train.num_processes' expects {expected} process(es) but the launch "
                            f"started {actual}{hint}")




def ddp_handlers(train_cfg: Any, use_ds: bool) -> list[DistributedDataParallelKwargs]:
    """accelerate's DDP wrapping options from train.ddp_*; under DeepSpeed a changed one is refused."""
    if use_ds:
        changed = [f"train.{k}" for k, v in DDP_DEFAULTS.items() if getattr(train_cfg, k) != v]
        if changed:
            raise GentrainError(f"config key {changed[0]!r} sets DDP's gradient all-reduce, which a DeepSpeed launch "
                                "does not use (DeepSpeed reduces gradients itself: reduce_bucket_size and "
                                "communication_data_type in its config)")
        return []
    return [DistributedDataParallelKwargs(bucket_cap_mb=train_cfg.ddp_bucket_mb,
                                          gradient_as_bucket_view=train_cfg.ddp_bucket_view,
                                          comm_hook=DDPCommunicationHookType(train_cfg.ddp_comm_hook))]


def make_accelerator(train_cfg: Any, run_dir: Path, trackers: list[str]) -> Accelerator:
    """Construct the Accelerator and run the launch guard.

    Without CUDA: `cpu=True` for DDP; under DeepSpeed (asked for by `accelerate launch`'s config)
    accelerate's DeepSpeed branch needs `cpu` off, gloo as the backend and DS_ACCELERATOR=cpu.
    """
    from gentrain.distributed.ds_config import deepspeed_requested
    from gentrain.distributed.fsdp2 import fsdp_requested

    cuda = torch.cuda.is_available()
    use_ds = deepspeed_requested()
    if fsdp_requested() and not use_ds:
        from gentrain.distributed.fsdp2 import settings

        settings(train_cfg.mixed_precision)   # refuse what cannot work before anything starts
    pg = {"timeout": timedelta(seconds=train_cfg.process_group_timeout_s)}
    if use_ds and not cuda:
        pg["backend"] = "gloo"
    handlers = [InitProcessGroupKwargs(**pg), *ddp_handlers(train_cfg, use_ds)]
    # FSDP2: gentrain shards its nets itself (fsdp2.py); accelerate is made as for DDP (on CPU it
    # would otherwise bring every process up as rank 0)
    with stdout_without(), _hidden_env("ACCELERATE_USE_FSDP" if fsdp_requested() else None):
        accelerator = Accelerator(
            cpu=not cuda and not use_ds,
            mixed_precision=train_cfg.mixed_precision,
            log_with=make_trackers(trackers, run_dir),
            project_dir=str(run_dir),
            kwargs_handlers=handlers,
        )
    if use_ds:
        # gentrain hands its own nets to deepspeed.initialize (which partitions them under ZeRO-3)
        # and keeps frozen helpers whole: transformers' global ZeRO-3 hook, set by accelerate, would
        # build every from_pretrained model (the text encoder) partitioned, and make diffusers'
        # EMAModel gather parameters it does not own. Switch it off.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    check_world_size(accelerator.num_processes, train_cfg.num_processes)
    return accelerator


@contextmanager
def _hidden_env(key: str | None) -> Iterator[None]:
    """Environment variable `key` unset for the duration (none when None)."""
    old = os.environ.pop(key, None) if key else None
    try:
        yield
    finally:
        if old is not None:
            os.environ[key] = old


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def deepspeed_config(accelerator: Accelerator, train_cfg: Any) -> dict | None:
    """The resolved DeepSpeed config of this launch (None without DeepSpeed)."""
    if not uses_deepspeed(accelerator):
        return None
    from gentrain.distributed.ds_config import resolve_config

    return resolve_config(accelerator.state.deepspeed_plugin.deepspeed_config, train_cfg, accelerator.num_processes)


def make_backend(accelerator: Accelerator, train_cfg: Any, nets: dict, phase_nets: list[tuple[str, ...]],
                 optimizers: list, zero_problem: Callable[[int], str | None] | None = None,
                 partial: tuple[str, ...] = (), fsdp_problem: Callable[[], str | None] | None = None,
                 twice: tuple[str, ...] = ()) -> Backend:
    """DDP through accelerate, one DeepSpeed engine per phase when the launch asks for DeepSpeed, or
    FSDP2 (fully_shard per trained net) when it asks for FSDP. `twice`: the nets a loss differentiates
    twice through (a penalty's double backward), which FSDP2 keeps gathered through their phase's step."""
    ds = deepspeed_config(accelerator, train_cfg)
    from gentrain.distributed.fsdp2 import fsdp_requested

    if ds is None and fsdp_requested():
        from gentrain.distributed.fsdp2 import FSDP2Backend, check_setup as fsdp_check, settings

        s = settings(train_cfg.mixed_precision)
        fsdp_check(fsdp_problem() if fsdp_problem else None)
        return FSDP2Backend(accelerator, nets, phase_nets, optimizers, s, partial=partial, hold=twice)
    if ds is None:
        from gentrain.distributed.ddp import DDPBackend

        return DDPBackend(accelerator, nets, phase_nets, optimizers, partial)
    from gentrain.distributed.deepspeed import DeepSpeedBackend
    from gentrain.distributed.ds_config import check_setup

    check_setup(ds, phase_nets, zero_problem)
    return DeepSpeedBackend(accelerator, nets, phase_nets, optimizers, ds, train_cfg.process_group_timeout_s,
                            partial=partial)


def is_main_env() -> bool:
    """Rank 0 as the launcher's environment says, usable before the Accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def process_state(timeout_s: int = 180):
    """accelerate's PartialState for jobs without a model to prepare (e.g. `data cache`):
    rank, process count, device, barriers; one process when not launched distributed."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))


def max_over_ranks(accelerator: Accelerator, value: int) -> int:
    """The largest of one integer per rank, known to every rank (no collective on one process)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).max())


def barrier(accelerator: Accelerator) -> None:
    accelerator.wait_for_everyone()


_PEER_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                 "connection refused", "gloo", "nccl")


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception raised in a collective means another rank died or hung (not a bug here)."""
    return isinstance(e, torch.distributed.DistError) or any(s in str(e).lower() for s in _PEER_FAILURE)


@contextmanager
def accelerate_autocast(nets: list[torch.nn.Module], precision: str):
    """Each net's forward under autocast with fp32 outputs, as ``Accelerator.prepare`` patches it."""
    if precision == "no":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for net in nets:
        net.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=dtype)(net.forward))
    try:
        yield
    finally:
        for net in nets:
            del net.forward
