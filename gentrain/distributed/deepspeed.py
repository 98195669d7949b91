"""DeepSpeed ZeRO 0-3: one engine per phase (its optimizer), launched through `accelerate launch`.

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

This module is the backend and its elastic reload. Beside it: ``ds_config`` (the DeepSpeed config,
every "auto" filled from gentrain's ``train.*`` keys), ``ds_engines`` (what an engine is built
from: NetGroup, offload, process-group timeouts), ``zero_shards`` (each rank's ZeRO shares and the
whole tensors back) and ``ds_files`` (DeepSpeed's own checkpoint files).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from gentrain import checkpoint as ckpt
from gentrain.errors import GentrainError
from gentrain.distributed import portable
from gentrain.distributed.ddp import all_ranks_agree
from gentrain.distributed.ds_config import offloads_optimizer, zero_stage
from gentrain.distributed.ds_engines import GroupMember, NetGroup, autocast_forward, engine_key, groups_time_out, \
    offload_optimizer
from gentrain.distributed.ds_files import save_engines
from gentrain.distributed.twins import loaded_twins
from gentrain.distributed.zero_shards import full_from_local, local_from_full, local_master, optimizer_share, set_master, \
    set_optimizer_state


class DeepSpeedBackend:
    """One DeepSpeed engine per phase (over its net, or a NetGroup of its nets); same methods as
    :class:`~.ddp.DDPBackend`."""

    kind = "deepspeed"
    reads = ("deepspeed",)   # kinds it resumes natively (its engines' files, same count); others: portable.py

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
        # each phase optimizer's (net, parameter) in state-dict order, before ZeRO flattens its groups
        self.opt_names = [portable.param_names(opt, nets) for opt in optimizers]
        for names, opt in zip(phase_nets, optimizers):
            if offloads_optimizer(ds_config):
                opt = offload_optimizer(opt)
            key = engine_key(names)
            module = nets[names[0]] if len(names) == 1 else NetGroup({n: nets[n] for n in names})
            engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=copy.deepcopy(ds_config))
            if dtype is not None:
                autocast_forward(engine.module, acc.device.type, dtype)
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
                out.append(local_master(p))
        return out

    # ---- EMA, sampling, checkpoints --------------------------------------------------------------
    def _trainable(self, name: str) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in self.raw_nets[name].named_parameters() if p.requires_grad]

    def ema_names(self, name: str) -> list[str]:
        return [k for k, _ in self._trainable(name)]

    def ema_params(self, name: str) -> list[Tensor]:
        return [local_master(p) for _, p in self._trainable(name)]

    def full_ema(self, name: str, shadow: list[Tensor]) -> dict[str, Tensor]:
        """Collective: the whole EMA of net `name` from every rank's share."""
        return {k: full_from_local(p, s) for (k, p), s in zip(self._trainable(name), shadow)}

    def local_ema(self, name: str, full: dict[str, Tensor]) -> list[Tensor]:
        return [local_from_full(p, full[k]) for k, p in self._trainable(name)]

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

        save_engines(self.engines, path / ckpt.DEEPSPEED, self._partial_engine, self.acc.is_main_process)
        for i, name in enumerate(self.order):  # the family's net order, as DDP's files (not the phases')
            sd = self.full_state_dict(name)
            if name in self.partial:
                sd = {k: v for k, v in sd.items() if k in self.partial[name]}
            if self.acc.is_main_process:
                save_file({k: v.contiguous() for k, v in sd.items()},
                          str(ckpt.model_file(path, i)))
            state, meta = self.full_optimizer_state(name)
            if self.acc.is_main_process and meta:
                save_file(state, str(ckpt.net_optimizer_file(path, name)), metadata=meta)

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
        out = {f"{k}::{key}": full_from_local(p, optimizer_share(p, key, base)).detach().cpu().contiguous()
               for key in keys for k, p in self._trainable(name)}
        return out, {"step": repr(step), "keys": ",".join(keys), "format": "gentrain-optimizer/1",
                     "zero_stage": str(self.stage)}   # whether a resume may take the native path (load)

    def _load_whole(self, path: Path, kind: str, names: list[str]) -> None:
        """Every rank: weights from the whole fp32 model files and optimizer state from the whole
        optimizer files (a ZeRO run's or a DDP / FSDP2 run's: portable.py), cut into this process
        count's shares (no DeepSpeed pickle is read)."""
        from safetensors.torch import load_file

        files = portable.weight_files(path, kind, names, self.phase_nets)
        whole = portable.whole_optimizer_state(path, kind, self.opt_names)
        for name in self.order:
            weights = load_file(str(files[name]))
            step, state = whole.get(name, (0.0, {}))
            keys, _ = self._state_keys(name)
            saved_keys = sorted({k for per in state.values() for k in per})
            if saved_keys != keys and keys:
                raise GentrainError(f"checkpoint {path} holds optimizer state {saved_keys} for net {name!r}; "
                                    f"this run's optimizer keeps {keys}")
            base = self._base_optimizer(name)
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
                if k not in weights:
                    raise GentrainError(f"{files[name]} has no tensor {k!r}: it was written for another net")
                set_master(p, weights[k].to(p.device))
                for key, v in state.get(k, {}).items():   # none: a parameter that never had a gradient (zeros)
                    set_optimizer_state(p, key, base, v.to(p.device))
            for st in base.state.values():
                old = st.get("step")
                st["step"] = torch.full_like(old, step) if torch.is_tensor(old) else \
                    (torch.tensor(step) if old is None else type(old)(step))

    def _saved_stage(self, path: Path) -> int | None:
        """The ZeRO stage a DeepSpeed checkpoint was written under (None: not recorded, older checkpoints)."""
        from safetensors import safe_open

        for name in self.order:
            f = ckpt.net_optimizer_file(path, name)
            if f.is_file():
                with safe_open(str(f), "pt") as h:
                    stage = (h.metadata() or {}).get("zero_stage")
                return None if stage is None else int(stage)
        return None

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        """DeepSpeed's files (pickles) are loaded only here, after the Trainer verified the
        checkpoint's manifest, so only checkpoints gentrain wrote reach torch.load. On another
        process count (elastic resume) or another ZeRO stage, gentrain's own full fp32 weight and
        optimizer files are cut into the new shares instead, as is any other backend's checkpoint
        (portable.py)."""
        kind = saved.get("backend", "deepspeed")
        if kind not in self.reads or int(saved.get("num_processes", self.acc.num_processes)) != self.acc.num_processes \
                or self._saved_stage(path) not in (None, self.stage):
            self._load_whole(path, kind, saved.get("nets") or self.order)
            return
        for key, engine in self.engines.items():
            where = path / ckpt.DEEPSPEED / key
            if not where.is_dir():
                raise GentrainError(f"checkpoint {path} has no DeepSpeed state for net {key!r} (was it written without "
                                    f"DeepSpeed? resume it the way it was launched)")
            loaded, _ = engine.load_checkpoint(str(path / ckpt.DEEPSPEED), tag=key, load_lr_scheduler_states=False,
                                               load_module_strict=not self._partial_engine(key))
            if loaded is None:
                raise GentrainError(f"DeepSpeed could not load {where}")
