"""Data-parallel training through accelerate (DDP, or one process): the default backend.

A *backend* is what the Trainer asks to prepare its nets and optimizers and to run, save and load
them; it never sees accelerate or DeepSpeed types itself. Every backend (this one,
``deepspeed.DeepSpeedBackend``, ``fsdp2.FSDP2Backend``) implements ``backend.Backend``.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from gentrain import checkpoint as ckpt
from gentrain.distributed import portable


def all_ranks_agree(acc: Accelerator, ok: Tensor) -> bool:
    """True only when `ok` holds on every rank (one all-reduce when distributed)."""
    ok = ok.to(acc.device)
    if acc.num_processes > 1:
        ok = acc.reduce(ok.float(), reduction="sum") == acc.num_processes
    return bool(ok)


def clip_grad_norm(acc: Accelerator, params: list[nn.Parameter], max_norm: float) -> Tensor:
    """The gradients' total 2-norm (float32), and the gradients clipped to `max_norm` (0: not
    clipped). What `acc.clip_grad_norm_` does for DDP and one process (unscale fp16 gradients,
    then torch's norm and clip), less its per-step DTensor grouping and second norm over the
    one-element stack of norms (the same value: sqrt(x * x) is x)."""
    acc.unscale_gradients()   # fp16: the scaler's unscale; a no-op otherwise
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=acc.device)
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.float()


class DDPBackend:
    """accelerate's `prepare` (DDP when launched on N processes) with one optimizer per phase."""

    kind = "ddp"
    reads = ("ddp", "fsdp2")   # kinds it resumes natively (an FSDP2 run writes DDP's files); others: portable.py

    def __init__(self, acc: Accelerator, nets: dict[str, nn.Module], phase_nets: list[tuple[str, ...]],
                 optimizers: list[torch.optim.Optimizer], partial: tuple[str, ...] = ()):
        """`partial`: nets checkpointed and averaged (EMA) by their trainable parameters only (LoRA
        adapters on a frozen pretrained net, which the family rebuilds from its source)."""
        self.acc = acc
        self.names = names = list(nets)
        prepared = acc.prepare(*[nets[n] for n in names], *optimizers)
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.nets = dict(zip(names, prepared[: len(names)]))
        self.optimizers = list(prepared[len(names):])
        # the torch optimizers inside accelerate's wrappers, for zero_grad: the wrapper's asks
        # inspect.signature on every call (~0.05 ms, twice a step) to then make this same call
        self._torch_optimizers = [getattr(o, "optimizer", o) for o in self.optimizers]
        self.phase_nets = phase_nets
        # unwrapped views, resolved once: accelerate's unwrap_model costs ~2 ms a call (it probes
        # installed packages), too much to pay every step for the EMA update
        self.raw_nets = {n: acc.unwrap_model(net) for n, net in self.nets.items()}
        self.partial = {n: [k for k, p in self.raw_nets[n].named_parameters() if p.requires_grad] for n in partial}
        self._ema_params: dict[str, list[Tensor]] = {}   # ema_params per net, resolved on first use
        if self.partial:
            acc.register_save_state_pre_hook(self._trainable_only)

    def _trainable_only(self, models: list, weights: list[dict], output_dir: str) -> None:
        """accelerate's save hook: a partial net's file holds its trainable tensors only."""
        for i, name in enumerate(self.names):
            if name in self.partial:
                keep = set(self.partial[name])
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    # ---- one optimizer step of a phase ---------------------------------------------------------
    def micro_step(self, phase: int, last: bool) -> AbstractContextManager[None]:
        """Gradients are synchronised only on the last micro-step of an accumulation."""
        if last:
            return nullcontext()
        with ExitStack() as stack:   # entered here, left when the caller's `with` ends
            for n in self.phase_nets[phase]:
                stack.enter_context(self.acc.no_sync(self.nets[n]))
            return stack.pop_all()

    def loss_ok(self, phase: int, loss: Tensor) -> bool:
        return True  # DDP decides after the backward, on the loss and the gradient norm together

    def backward(self, phase: int, loss: Tensor, grad_accum: int) -> None:
        """What `acc.backward` does under DDP, less its division by accelerate's own accumulation
        count (always 1 here: the Trainer accumulates), a tensor op and a backward node a step."""
        loss = loss / grad_accum if grad_accum > 1 else loss   # x / 1 is x: one op less
        scaler = self.acc.scaler   # fp16: the gradient scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, phase: int, params: list[nn.Parameter], loss: Tensor, max_norm: float) -> tuple[Tensor, bool]:
        """Clip, check that loss and gradient norm are finite on every rank, then step or drop
        the gradients; returns (gradient norm, applied)."""
        opt = self.optimizers[phase]
        norm = clip_grad_norm(self.acc, params, max_norm)
        if self.acc.num_processes == 1:   # the same test read on the host: no tensor ops
            ok = math.isfinite(loss) and math.isfinite(norm)
        else:
            ok = all_ranks_agree(self.acc, torch.isfinite(loss) & torch.isfinite(norm.to(loss.device)))
        if ok:
            opt.step()
        self.zero_grad(phase)
        return norm, ok

    def zero_grad(self, phase: int) -> None:
        self._torch_optimizers[phase].zero_grad(set_to_none=True)

    def weight_tensors(self, name: str) -> list[Tensor]:
        """Every tensor that holds net `name`'s weights, for an in-place edit after a step (WGAN's
        clipping): here its parameters."""
        return list(self.raw_nets[name].parameters())

    # ---- EMA, sampling, checkpoints --------------------------------------------------------------
    def ema_params(self, name: str) -> list[Tensor]:
        """The tensors an EMA of net `name` follows, in `ema_names` order (all parameters; a
        partial net's trainable ones). Resolved once: the EMA asks every step, and the two passes over
        the net's modules cost 1.7 ms a call on an SD 1.5-layout UNet (708 modules; a loaded 2-core
        machine). prepare() has run, so the parameters stay these objects (a load copies into them)."""
        if name not in self._ema_params:
            params = dict(self.raw_nets[name].named_parameters())
            self._ema_params[name] = [params[k] for k in self.ema_names(name)]
        return list(self._ema_params[name])

    def ema_names(self, name: str) -> list[str]:
        if name in self.partial:
            return list(self.partial[name])
        return [k for k, _ in self.raw_nets[name].named_parameters()]

    def full_ema(self, name: str, shadow: list[Tensor]) -> dict[str, Tensor]:
        return dict(zip(self.ema_names(name), shadow))

    def local_ema(self, name: str, full: dict[str, Tensor]) -> list[Tensor]:
        return [full[k] for k in self.ema_names(name)]

    @contextmanager
    def sampling_nets(self, main: bool, ema: dict[str, dict[str, Tensor]]) -> Iterator[dict[str, nn.Module]]:
        """The unwrapped nets in eval mode with the given EMA weights swapped in (on the main
        process; the others get an empty dict), restored afterwards."""
        if not main:
            yield {}
            return
        raw = self.raw_nets
        modes = {n: m.training for n, m in raw.items()}
        saved = {n: [p.detach().clone() for p in raw[n].parameters()] for n in ema}
        try:
            for n, shadow in ema.items():
                for k, p in raw[n].named_parameters():
                    if k in shadow:
                        p.data.copy_(shadow[k].to(p.device, p.dtype))
            yield {n: m.eval() for n, m in raw.items()}
        finally:
            for n, old in saved.items():
                for p, s in zip(raw[n].parameters(), old):
                    p.data.copy_(s)
            for n, m in raw.items():
                m.train(modes[n])

    def save(self, path: Path) -> None:
        """Every rank: nets (safetensors `model.safetensors`, `model_1.safetensors`, ...) and
        optimizers (accelerate's files, loaded weights_only)."""
        self.acc.save_state(str(path), safe_serialization=True)

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        """Every rank: accelerate's files (DDP's own or an FSDP2 run's, any process count); a DeepSpeed
        run's whole weights and whole optimizer state through portable.py."""
        kind = saved.get("backend", "ddp")
        if kind not in self.reads:
            self._load_portable(path, kind, saved.get("nets") or self.names)
            return
        if not self.partial:
            self.acc.load_state(str(path))
            return
        from safetensors import safe_open

        for i, name in enumerate(self.names):  # a partial file must hold exactly what the net trains
            f = ckpt.model_file(path, i)
            with safe_open(str(f), "pt") as h:
                ckpt.check_keys(f, set(h.keys()), self.partial.get(name) or self.raw_nets[name].state_dict().keys())
        self.acc.load_state(str(path), strict=False)

    def _load_portable(self, path: Path, kind: str, names: list[str]) -> None:
        from safetensors.torch import load_file

        for name, f in portable.weight_files(path, kind, names, self.phase_nets).items():
            module, full = self.raw_nets[name], load_file(str(f))
            ckpt.check_keys(f, set(full), self.partial.get(name) or module.state_dict().keys())
            module.load_state_dict(full, strict=name not in self.partial)
        phases = [portable.param_names(o, self.raw_nets) for o in self.optimizers]
        state = portable.whole_optimizer_state(path, kind, phases)
        for opt, names_ in zip(self.optimizers, phases):
            opt.load_state_dict(portable.torch_state_dict(opt, names_, state))
