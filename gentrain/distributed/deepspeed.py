"""DeepSpeed ZeRO 0-3: one engine per phase (its optimizer), launched through `accelerate launch`.

accelerate reads the DeepSpeed settings (stage, offload, a JSON file) from its config file or
environment; gentrain fills every "auto" from its own ``train.*`` keys (micro-batch, gradient
accumulation, clipping, precision) and refuses an explicit value that disagrees with them.
Each phase gets its own ``deepspeed.initialize`` engine (a GAN or an autoencoder with a
discriminator gets two): accelerate's single-engine ``prepare`` refuses two models, and its
multi-plugin mode routes every backward through one engine. A phase that trains several nets
with one optimizer (CycleGAN's two generators, its two discriminators) gets one engine over a
:class:`NetGroup` of them, each net called through it by name. Nets that a phase does not train
are frozen and used unwrapped (the Trainer's job), so a generator loss that runs through the
discriminator leaves the discriminator's engine untouched.

EMA under ZeRO follows each rank's own share of the fp32 master weights (no gather per step);
the full EMA and the full fp32 weights are gathered only to save, preview or evaluate, and
written as the same ``model*.safetensors`` / ``ema_*.safetensors`` files a DDP run writes, so
`gentrain sample|eval|export` read a ZeRO-3 run exactly as a DDP one. DeepSpeed's own
optimizer files are pickles: they are loaded only from a checkpoint whose manifest (sizes +
sha256, written by gentrain last) verifies.
"""
from __future__ import annotations

import copy
import json
import os
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from gentrain.errors import GentrainError
from gentrain.distributed.ddp import all_ranks_agree
from gentrain.distributed.ds_files import save_engines
from gentrain.distributed.twins import loaded_twins

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


def _offload_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same Adam/AdamW as DeepSpeedCPUAdam, the optimizer DeepSpeed's offload is built for."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise GentrainError(f"optimizer offload supports Adam/AdamW only, not {type(opt).__name__}")
    g = opt.param_groups[0]
    params = [p for group in opt.param_groups for p in group["params"]]
    return DeepSpeedCPUAdam(params, lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                            adamw_mode=isinstance(opt, torch.optim.AdamW))


def _autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run the module's forward under autocast and hand fp32 outputs back (as accelerate does
    for DDP): DeepSpeed bf16 keeps bf16 weights, and fp32 inputs would not match them."""
    from accelerate.utils import convert_outputs_to_fp32

    module.forward = convert_outputs_to_fp32(torch.autocast(device_type, dtype=dtype)(module.forward))


# ---- each rank's share of the fp32 master weights, and the full tensor back ----------------------

def _local_master(p: nn.Parameter) -> Tensor:
    """This rank's share of `p`'s fp32 master weights, a live view. diffusers' EMAModel averages
    only tensors that require grad (it copies the others), which these views do."""
    if hasattr(p, "ds_id"):                     # ZeRO-3: this rank's partition (1-D, padded)
        share = p._z3_optimizer.get_local_fp32_param(p)
    elif hasattr(p, "_hp_mapping"):             # ZeRO-1/2 and the bf16 optimizer: a fragment, maybe none
        share = (p._hp_mapping.get_hp_fragment() if p._hp_mapping is not None
                 else torch.empty(0, device=p.device, requires_grad=True))
    elif p.dtype != torch.float32:              # stage 0 in bf16: no per-parameter fp32 master is exposed
        raise GentrainError("an EMA under DeepSpeed ZeRO-0 in bf16 would average the bf16 weights, not the fp32 "
                            "master (measured: resume then differs by 3e-3): use ZeRO stage 1 or higher, or "
                            "train.ema_decay=0")
    else:                                       # stage 0 in fp32: the parameter is the master
        share = p
    if not share.requires_grad:
        raise RuntimeError(f"DeepSpeed's fp32 master of a {tuple(p.shape)} parameter does not require grad: "
                           "diffusers' EMAModel would copy it instead of averaging it")
    return share


def _full_from_local(p: nn.Parameter, local: Tensor) -> Tensor:
    """Collective: the whole fp32 tensor of parameter `p` from every rank's `local` share."""
    from deepspeed import comm as dist

    if hasattr(p, "ds_id"):
        parts = torch.empty(dist.get_world_size(group=p.ds_process_group) * local.numel(), dtype=torch.float32,
                            device=local.device)
        dist.all_gather_into_tensor(parts, local.float().contiguous(), group=p.ds_process_group)
        return parts[: p.ds_numel].view(p.ds_shape).clone()
    if hasattr(p, "_hp_mapping"):
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        if p._hp_mapping is not None:
            a = p._hp_mapping.lp_fragment_address
            buf.narrow(0, a.start, a.numel).copy_(local)
        dist.all_reduce(buf, group=p._dp_group)
        return buf.view(p.shape)
    return local.detach().float().clone()


def _local_from_full(p: nn.Parameter, full: Tensor) -> Tensor:
    flat = full.detach().float().flatten().to(p.device)
    if hasattr(p, "ds_id"):
        from deepspeed import comm as dist

        size = p.ds_tensor.ds_numel
        start = dist.get_rank(group=p.ds_process_group) * size
        out = torch.zeros(size, dtype=torch.float32, device=p.device)
        piece = flat[start: start + size]
        out[: piece.numel()] = piece
        return out
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:
            return torch.empty(0, device=p.device)
        a = p._hp_mapping.lp_fragment_address
        return flat.narrow(0, a.start, a.numel).clone()
    return flat.view(p.shape).clone()


def _optimizer_share(p: nn.Parameter, key: str, base: torch.optim.Optimizer) -> Tensor:
    """This rank's share of optimizer state `key` of parameter `p`, laid out as `_local_master`."""
    if hasattr(p, "ds_id"):
        return p._z3_optimizer.get_local_fp32_param(p, key)
    if hasattr(p, "_hp_mapping"):
        return p._hp_mapping.get_hp_fragment(key) if p._hp_mapping is not None else torch.empty(0, device=p.device)
    return base.state[p][key]


def _set_master(p: nn.Parameter, full: Tensor) -> None:
    """The whole fp32 value `full` into `p`: its fp32 master share and its working copy."""
    local = _local_from_full(p, full)
    if hasattr(p, "ds_id"):
        p._z3_optimizer.set_local_hp_param(local, p)
        p.ds_tensor.data.copy_(local.to(p.ds_tensor.dtype))
        return
    if hasattr(p, "_hp_mapping") and p._hp_mapping is not None:
        p._hp_mapping.get_hp_fragment().data.copy_(local)
    p.data.copy_(full.to(p.device, p.dtype))


def _set_optimizer_state(p: nn.Parameter, key: str, base: torch.optim.Optimizer, full: Tensor) -> None:
    local = _local_from_full(p, full)
    if hasattr(p, "ds_id"):
        p._z3_optimizer.set_local_hp_param(local, p, key)
    elif hasattr(p, "_hp_mapping"):
        if p._hp_mapping is not None:
            p._hp_mapping.get_hp_fragment(key).data.copy_(local)
    else:   # stage 0 in fp32: the client optimizer's own per-parameter state
        base.state[p][key] = local.view_as(p)


def groups_time_out(timeout_s: float) -> None:
    """Every process group times out after `timeout_s`, as the default group does: DeepSpeed makes
    its data-parallel groups with torch.distributed.new_group and no timeout, i.e. torch's default
    (30 min for gloo), so a frozen rank would hang its peers in ZeRO's collectives for that long.
    Applied to the groups that exist and to those made later."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)
    real = dist.new_group
    if getattr(real, "_gentrain_timeout", None) is not None:
        real = real.__wrapped__

    def new_group(*args: Any, **kwargs: Any):
        if len(args) < 2 and kwargs.get("timeout") is None:
            kwargs["timeout"] = timeout
        return real(*args, **kwargs)

    new_group.__wrapped__, new_group._gentrain_timeout = real, timeout
    dist.new_group = new_group


class NetGroup(nn.Module):
    """The nets one optimizer trains, as the one module of their DeepSpeed engine: ``forward(name,
    ...)`` runs net `name`, so each call goes through the engine (ZeRO-3's parameter hooks, autocast)."""

    def __init__(self, nets: dict[str, nn.Module]):
        super().__init__()
        self.nets = nn.ModuleDict(nets)

    def forward(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.nets[name](*args, **kwargs)


class GroupMember:
    """Net `name` of a :class:`NetGroup` engine, called as the net itself."""

    def __init__(self, engine: Any, name: str):
        self.engine, self.name = engine, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(self.name, *args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.engine.module.nets[self.name]

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters(recurse)


def engine_key(nets: tuple[str, ...]) -> str:
    """A phase's engine name: its net's name (deepspeed/NET/ in checkpoints), or theirs joined by '+'."""
    return "+".join(nets)


class DeepSpeedBackend:
    """One DeepSpeed engine per phase (over its net, or a NetGroup of its nets); same methods as
    :class:`~.ddp.DDPBackend`."""

    kind = "deepspeed"

    def __init__(self, acc: Accelerator, nets: dict[str, nn.Module], phase_nets: list[tuple[str, ...]],
                 optimizers: list[torch.optim.Optimizer], ds_config: dict, timeout_s: float = 1800,
                 partial: tuple[str, ...] = ()):
        """`partial`: nets that train adapters on a frozen base (LoRA): their checkpoints, gentrain's
        and DeepSpeed's, hold the trainable tensors only (the family rebuilds the base from its source)."""
        import deepspeed

        groups_time_out(timeout_s)

        self.acc, self.config, self.phase_nets = acc, ds_config, phase_nets
        self.stage = zero_stage(ds_config)
        main = acc.is_main_process
        # previews and eval run on the main rank alone: they use a plain twin of each net, loaded
        # with the gathered weights (kept on the CPU between uses)
        self.twins = {n: copy.deepcopy(net).to("cpu") for n, net in nets.items()} if main else {}
        self.nets: dict[str, Any] = {}
        self.optimizers: list[torch.optim.Optimizer] = []
        self.engines: dict[str, Any] = {}      # by engine_key(phase nets)
        self.engine_of: dict[str, str] = {}    # net -> its engine's key
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        for names, opt in zip(phase_nets, optimizers):
            if offloads_optimizer(ds_config):
                opt = _offload_optimizer(opt)
            key = engine_key(names)
            module = nets[names[0]] if len(names) == 1 else NetGroup({n: nets[n] for n in names})
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=copy.deepcopy(ds_config))
            if dtype is not None:
                _autocast_forward(engine.module, acc.device.type, dtype)
            self.engines[key] = engine
            for n in names:
                self.engine_of[n] = key
                self.nets[n] = engine if len(names) == 1 else GroupMember(engine, n)
            self.optimizers.append(opt)  # the client optimizer: gentrain's LR schedule sets its groups' lr
        self.order = [n for n in nets if n in self.engine_of]
        self.raw_nets = {n: self.nets[n].module for n in self.order}
        self.partial = {n: {k for k, p in self.raw_nets[n].named_parameters() if p.requires_grad}
                        for n in partial if n in self.raw_nets}
        self._micro, self._norm = 0, None

    def _engine(self, phase: int):
        return self.engines[engine_key(self.phase_nets[phase])]

    def _partial_engine(self, key: str) -> bool:
        """Whether engine `key` trains only part of a net (adapters): its checkpoint leaves the frozen rest out."""
        return any(n in self.partial for n, k in self.engine_of.items() if k == key)

    # ---- one optimizer step of a phase ---------------------------------------------------------
    @contextmanager
    def micro_step(self, phase: int, last: bool) -> Iterator[None]:
        self._engine(phase).set_gradient_accumulation_boundary(last)
        yield

    def loss_ok(self, phase: int, loss: Tensor) -> bool:
        """DeepSpeed steps inside its engine, so a non-finite loss is caught before the backward
        (every rank agrees); then nothing of the step has run and it is skipped."""
        ok = all_ranks_agree(self.acc, torch.isfinite(loss.detach()))
        if not ok and self._micro:
            raise GentrainError("non-finite loss in a later micro-step under DeepSpeed with train.grad_accum > 1: the "
                                "engine already holds this step's partial gradients; stopped (the last checkpoint is intact)")
        return ok

    def backward(self, phase: int, loss: Tensor, grad_accum: int) -> None:
        engine = self._engine(phase)
        engine.backward(loss)   # DeepSpeed divides by gradient_accumulation_steps itself
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0 \
                and not engine.bfloat16_enabled():
            # stage 0 in fp32 steps the client optimizer and keeps no norm: take it from the
            # all-reduced gradients before the engine's step clips and zeroes them
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            self._norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        engine.step()           # a no-op until the accumulation boundary
        self._micro = (self._micro + 1) % grad_accum

    def step(self, phase: int, params: list[nn.Parameter], loss: Tensor, max_norm: float) -> tuple[Tensor, bool]:
        """The engine stepped at the boundary (clipping included); report its gradient norm."""
        raw = self._engine(phase).get_global_grad_norm()
        if raw is None:  # stage 0 in fp32 (see backward)
            raw, self._norm = self._norm, None
        norm = torch.as_tensor(float(raw), dtype=torch.float32)
        if not torch.isfinite(norm):
            raise GentrainError("non-finite gradient norm under DeepSpeed: its optimizer has applied the step, which "
                                "cannot be undone; stopped (the last checkpoint is intact). Lower train.lr or check the data")
        return norm, True

    def zero_grad(self, phase: int) -> None:
        pass  # the engine zeroes its gradients in step()

    def weight_tensors(self, name: str) -> list[Tensor]:
        """Every tensor that holds net `name`'s weights, for an in-place elementwise edit after a step
        (WGAN's clipping): the module's parameters (under ZeRO-3 also this rank's partition of each) and
        this rank's share of the fp32 master weights where DeepSpeed keeps them apart (ZeRO 1-3,
        bf16), so the edit holds in the next forward and in the optimizer's next update alike."""
        out: list[Tensor] = []
        for _, p in self._trainable(name):
            zero3 = hasattr(p, "ds_id")   # p.data: the full tensor where ZeRO-3 keeps it whole (small ones)
            out += [p.data, p.ds_tensor] if zero3 else [p]
            if zero3 or getattr(p, "_hp_mapping", None) is not None:   # else (stage 0, fp32) p is the master
                out.append(_local_master(p))
        return out

    # ---- EMA, sampling, checkpoints --------------------------------------------------------------
    def _trainable(self, name: str) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in self.raw_nets[name].named_parameters() if p.requires_grad]

    def ema_names(self, name: str) -> list[str]:
        return [k for k, _ in self._trainable(name)]

    def ema_params(self, name: str) -> list[Tensor]:
        return [_local_master(p) for _, p in self._trainable(name)]

    def full_ema(self, name: str, shadow: list[Tensor]) -> dict[str, Tensor]:
        """Collective: the whole EMA of net `name` from every rank's share."""
        return {k: _full_from_local(p, s) for (k, p), s in zip(self._trainable(name), shadow)}

    def local_ema(self, name: str, full: dict[str, Tensor]) -> list[Tensor]:
        return [_local_from_full(p, full[k]) for k, p in self._trainable(name)]

    def full_state_dict(self, name: str) -> dict[str, Tensor]:
        """Collective: net `name`'s state dict with the fp32 master weights (not the bf16 copies)."""
        from deepspeed.utils import safe_get_full_fp32_param
        from deepspeed.runtime.zero import GatheredParameters

        module = self.raw_nets[name]
        params = dict(module.named_parameters())
        out: dict[str, Tensor] = {}
        for k, v in module.state_dict().items():
            p = params.get(k)
            if p is None:
                out[k] = v.detach().cpu().clone()        # buffers are whole on every rank
            elif p.requires_grad and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")):
                out[k] = safe_get_full_fp32_param(p).detach().cpu().clone()
            else:
                with GatheredParameters([p]) if hasattr(p, "ds_id") else nullcontext():
                    out[k] = p.detach().float().cpu().clone()
        return out

    @contextmanager
    def sampling_nets(self, main: bool, ema: dict[str, dict[str, Tensor]]) -> Iterator[dict[str, nn.Module]]:
        """Collective (every rank calls it): the full weights, EMA swapped in, loaded into the main
        rank's twins, which it gets in eval mode; the others get an empty dict."""
        full = {n: self.full_state_dict(n) for n in self.order}
        if not main:
            yield {}
            return
        with loaded_twins(self.twins, full, ema, self.acc.device) as twins:
            yield twins

    def save(self, path: Path) -> None:
        """Every rank: each engine's DeepSpeed checkpoint under deepspeed/NET/ (`latest` files: ds_files.py), and
        the main rank writes the full fp32 weights as model*.safetensors (the names a DDP run uses)."""
        from safetensors.torch import save_file

        save_engines(self.engines, path / "deepspeed", self._partial_engine, self.acc.is_main_process)
        for i, name in enumerate(self.order):  # the family's net order, as DDP's files (not the phases')
            sd = self.full_state_dict(name)
            if name in self.partial:
                sd = {k: v for k, v in sd.items() if k in self.partial[name]}
            if self.acc.is_main_process:
                save_file({k: v.contiguous() for k, v in sd.items()},
                          str(path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))
            state, meta = self.full_optimizer_state(name)
            if self.acc.is_main_process and meta:
                save_file(state, str(path / f"optimizer_{name}.safetensors"), metadata=meta)

    # ---- the optimizer state whole, by parameter name: what resumes on another process count -------
    def _base_optimizer(self, name: str) -> torch.optim.Optimizer:
        opt = self.engines[self.engine_of[name]].optimizer
        return getattr(opt, "optimizer", opt)   # ZeRO and bf16 wrap the client optimizer

    def _state_keys(self, name: str) -> tuple[list[str], float]:
        """The per-element state keys of the net's optimizer (Adam: exp_avg, exp_avg_sq) and its step."""
        base = self._base_optimizer(name)
        first = next(iter(base.state.values()), None)
        if first is None:
            return [], 0.0
        keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and k != "step" and v.dim() > 0)
        step = first.get("step", 0)
        return keys, float(step.item() if torch.is_tensor(step) else step)

    def full_optimizer_state(self, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Collective: {"PARAM::KEY": the whole fp32 tensor} of net `name`'s optimizer, and its step,
        gathered from the shares as the EMA is. Written beside DeepSpeed's own (partitioned, pickled)
        files so a checkpoint resumes on another process count without them."""
        keys, step = self._state_keys(name)
        base = self._base_optimizer(name)
        mapped = lambda p: hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") or p in base.state
        if not all(mapped(p) for _, p in self._trainable(name)):
            return {}, {}   # an optimizer whose state is not laid out by parameter (e.g. ZeRO-0 in bf16)
        out = {f"{k}::{key}": _full_from_local(p, _optimizer_share(p, key, base)).detach().cpu().contiguous()
               for key in keys for k, p in self._trainable(name)}
        return out, {"step": repr(step), "keys": ",".join(keys), "format": "gentrain-optimizer/1"}

    def _load_elastic(self, path: Path) -> None:
        """Every rank: weights from the full fp32 model files and optimizer state from the full
        optimizer files, cut into this process count's shares (no DeepSpeed pickle is read)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        for i, name in enumerate(self.order):
            weights = load_file(str(path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))
            f = path / f"optimizer_{name}.safetensors"
            if not f.is_file():
                raise GentrainError(f"checkpoint {path} has no optimizer_{name}.safetensors (an older checkpoint, or a "
                                    "DeepSpeed set-up whose optimizer state gentrain cannot map to parameters, such as "
                                    "ZeRO-0 in bf16): resume it on the process count that wrote it")
            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
            state = load_file(str(f))
            keys, _ = self._state_keys(name)
            saved_keys = [k for k in meta.get("keys", "").split(",") if k]
            if saved_keys != keys and keys:
                raise GentrainError(f"{f} holds optimizer state {saved_keys}; this run's optimizer keeps {keys}")
            base, step = self._base_optimizer(name), float(meta.get("step", "0"))
            module = self.raw_nets[name]
            for k, v in module.state_dict().items():   # buffers are whole on every rank
                if k in weights and k not in dict(module.named_parameters()):
                    v.copy_(weights[k])
            # DeepSpeed creates the optimizer state of its flat fp32 partitions at the first step (and
            # links each parameter's fragment of it then): create and link it now, to fill it
            zopt = self.engines[self.engine_of[name]].optimizer   # once per engine: what is made is kept
            flats = next((getattr(zopt, a) for a in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                                                      "fp32_groups_flat_partition") if getattr(zopt, a, None)), [])
            for flat in flats:
                st = base.state[flat]
                for key in saved_keys:
                    st.setdefault(key, torch.zeros_like(flat))
            if flats and hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
                zopt._lazy_init_hp_params_optimizer_state()
            for k, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                _set_master(p, weights[k].to(p.device))
                for key in saved_keys:
                    _set_optimizer_state(p, key, base, state[f"{k}::{key}"].to(p.device))
            for st in base.state.values():
                old = st.get("step")
                st["step"] = torch.full_like(old, step) if torch.is_tensor(old) else \
                    (torch.tensor(step) if old is None else type(old)(step))

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        """DeepSpeed's files (pickles) are loaded only here, after the Trainer verified the
        checkpoint's manifest, so only checkpoints gentrain wrote reach torch.load. On another
        process count (elastic resume) gentrain's own full fp32 weight and optimizer files are cut
        into the new shares instead."""
        if int(saved.get("num_processes", self.acc.num_processes)) != self.acc.num_processes:
            self._load_elastic(path)
            return
        for key, engine in self.engines.items():
            where = path / "deepspeed" / key
            if not where.is_dir():
                raise GentrainError(f"checkpoint {path} has no DeepSpeed state for net {key!r} (was it written without "
                                    f"DeepSpeed? resume it the way it was launched)")
            loaded, _ = engine.load_checkpoint(str(path / "deepspeed"), tag=key, load_lr_scheduler_states=False,
                                               load_module_strict=not self._partial_engine(key))
            if loaded is None:
                raise GentrainError(f"DeepSpeed could not load {where}")
