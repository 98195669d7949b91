"""The one training loop. Families plug in through `Objective` (nets, phases, loss, sample).

The loop owns: gradient accumulation, clipping, mixed precision, one optimizer + LR schedule per
phase, EMA (train/ema.py), the NaN/inf guard, logging (metrics.jsonl + TensorBoard through
the trackers in distributed/trackers.py), preview grids; checkpoints and resume are in
train/state.py.
"""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from gentrain.data_pipeline.build import build_stream
from gentrain.data_pipeline.transforms import batch_images_to_unit
from gentrain.errors import GentrainError
from gentrain.config import Config
from gentrain.distributed.backend import Backend
from gentrain.distributed.core import barrier, is_peer_failure, make_accelerator, make_backend, max_over_ranks, set_seed
from gentrain.distributed.trackers import flush_trackers, log_image
from gentrain import checkpoint as ckpt
from gentrain.train import fastpaths
from gentrain.train.ema import build_emas, snapshot_if_due
from gentrain.eval.scope import check_eval_data
from gentrain.eval.metrics import evaluate
from gentrain.train.optim import build_optimizer, build_schedule
from gentrain.objectives import BatchRNG, Objective, Runtime, build_objective
from gentrain.train.preview import render
from gentrain.train import state
from gentrain.train.stop import StopSignals, stop_message, stop_on_signals


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, resume_from: Path | None = None,
                 objective: Objective | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        self.acc = make_accelerator(t, self.run_dir, cfg.run.trackers)
        self.main = self.acc.is_main_process
        set_seed(t.seed)  # identical initial weights on every rank
        self.objective = objective or build_objective(cfg)
        self.objective.to(self.acc.device)
        self.phases = self.objective.phases()

        nets = self.objective.nets
        trained = [n for ph in self.phases for n in ph.nets]
        fastpaths.set_tf32(t.allow_tf32)
        if t.channels_last:  # before the optimizers and DDP see the parameters
            fastpaths.to_channels_last(nets, trained)
        self.params = {ph.name: [p for n in ph.nets for p in nets[n].parameters() if p.requires_grad]
                       for ph in self.phases}
        opts = [build_optimizer(ph, self.params[ph.name], t) for ph in self.phases]
        # DDP through accelerate, or one DeepSpeed engine per phase (gentrain/distributed)
        self.backend: Backend = make_backend(self.acc, t, dict(nets), [ph.nets for ph in self.phases], opts,
                                    zero_problem=self.objective.zero_problem, partial=self.objective.partial_nets,
                                    fsdp_problem=self.objective.fsdp_problem,
                                    twice=self.objective.twice_differentiated)
        nets.update(self.backend.nets)
        self.raw_nets = self.backend.raw_nets
        # the parameters as the backend left them: FSDP2 replaced each by its shard, and holding the
        # old ones would keep every rank's whole fp32 weights alive (measured: tests/launch/test_plan.py)
        self.params = {ph.name: [p for n in ph.nets for p in self.raw_nets[n].parameters() if p.requires_grad]
                       for ph in self.phases}
        if t.compile != "no":  # the module's forward: wrappers (DDP, DeepSpeed engines) call it
            for n in dict.fromkeys(trained):
                fastpaths.compile_forward(self.raw_nets[n], t.compile)
        # Schedulers are not passed to prepare(): accelerate would step them num_processes times
        # per call; here each follows the training step, whatever the process count (optim.py).
        self.schedulers = [build_schedule(ph, o, t) for ph, o in zip(self.phases, self.backend.optimizers)]
        self.emas = build_emas(t, self.objective.ema_nets, self.backend)   # fixed or posthoc (train/ema.py)

        # images arrive uint8 and become float on the device (_next_batch), as DALI and FFCV do
        self.stream = build_stream(cfg.data, batch_size=t.batch_size, rank=self.acc.process_index,
                                   world_size=self.acc.num_processes, seed=t.seed, uint8_images=True)
        check_eval_data(cfg, say=self.main)  # eval.shards found, evaluators that do not apply to the data said
        self.step, self.images, self.nan_total, self.nan_streak = 0, 0, 0, 0
        self.stop_signals, self.stopped_by = StopSignals(), None
        set_seed(t.seed)  # one stream on every rank; per-sample draws take the rank's rows of a global draw
        self.runtime = Runtime(BatchRNG(self.acc.process_index, self.acc.num_processes), plain_nets=self.raw_nets,
                               weight_tensors=self.backend.weight_tensors)
        self.objective.bind(self.runtime)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.main:  # once everything it names was found: a run that failed to start leaves no config.yaml
            from gentrain.train.runs import write_run_config

            write_run_config(cfg, self.run_dir)
        self.acc.init_trackers("gentrain")

    # ---- data -----------------------------------------------------------------------------
    def _next_batch(self, it: Iterator[dict]) -> dict[str, Any]:
        # Data code in this process (iterator set-up, shuffles) must not draw from the training
        # RNG, or a resumed run would see different noise than an uninterrupted one.
        state = torch.get_rng_state()
        batch = next(it)
        torch.set_rng_state(state)
        batch = batch_images_to_unit({k: v.to(self.acc.device, non_blocking=True) if isinstance(v, torch.Tensor)
                                      else v for k, v in batch.items()})
        if self.cfg.train.channels_last:
            batch = fastpaths.batch_channels_last(batch)
        self.images += self.objective.batch_size(batch) * self.acc.num_processes
        return batch

    # ---- one phase: accumulate, clip, guard, step -------------------------------------------
    def _phase_nets(self, phase) -> AbstractContextManager[None]:
        """During a phase the nets it does not train are frozen and used unwrapped: no gradient
        is computed for them (a generator loss runs through the discriminator without touching
        it), and DDP or DeepSpeed see only the nets being trained. Nothing to do (and no
        generator to run every step) when the phase trains every net."""
        others = [n for n in self.objective.nets if n not in phase.nets]
        return self._frozen(others) if others else nullcontext()

    @contextmanager
    def _frozen(self, others: list[str]) -> Iterator[None]:
        flags = {n: [p.requires_grad for p in self.raw_nets[n].parameters()] for n in others}
        try:
            for n in others:
                self.objective.nets[n] = self.raw_nets[n].requires_grad_(False)
            yield
        finally:
            for n in others:
                for p, f in zip(self.raw_nets[n].parameters(), flags[n]):
                    p.requires_grad_(f)
                self.objective.nets[n] = self.backend.nets[n]

    def _run_phase(self, i: int, it: Iterator[dict]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        phase, backend = self.phases[i], self.backend
        t = self.cfg.train
        # no zero_grad first: every backend's step() leaves the phase's gradients dropped (applied
        # or not), and nothing else writes .grad (penalties use autograd.grad)
        logs: dict = {}
        ok, norm = True, None
        with self._phase_nets(phase):
            for micro in range(t.grad_accum):
                batch = self._next_batch(it)
                with backend.micro_step(i, last=micro == t.grad_accum - 1):
                    loss, logs = self.objective.loss(phase.name, batch)
                    if not backend.loss_ok(i, loss):  # DeepSpeed: caught before its engine steps
                        total, ok = loss.detach().float(), False
                        break
                    backend.backward(i, loss, t.grad_accum)
                # the mean of the micro-batches' losses; with one, the loss itself (no tensor op)
                part = loss.detach().float()
                part = part / t.grad_accum if t.grad_accum > 1 else part
                total = part if micro == 0 else total + part
            if ok:
                norm, ok = backend.step(i, self.params[phase.name], total, t.max_grad_norm)
        if norm is None:
            norm = torch.full((), float("nan"))
        if ok:
            self.objective.after_step(phase.name)
            for n in phase.nets:
                if n in self.emas:
                    self.emas[n].step(backend.ema_params(n))
            self.nan_streak = 0
        else:
            backend.zero_grad(i)
            self.nan_total += 1
            self.nan_streak += 1
            if self.nan_streak >= t.nan_patience:
                raise GentrainError(
                    f"training diverged: {self.nan_streak} non-finite steps in a row (phase {phase.name!r}, "
                    f"step {self.step + 1}, loss {total.item():.4g}, grad norm {float(norm):.4g}); nothing was "
                    f"saved from them. Lower train.lr, enable train.max_grad_norm, or check the data")
        return total, norm.float(), logs

    # ---- the loop ----------------------------------------------------------------------------
    @stop_on_signals
    def train(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to train.max_steps; with stop_at, save a checkpoint at that step and return early
        (a time-sliced job: the schedule still spans max_steps, `--resume auto` continues)."""
        t = self.cfg.train
        end = min(t.max_steps, stop_at) if stop_at else t.max_steps
        if t.sample_every and self.step == 0 and self.objective.preview_at_start:
            self.preview()   # e.g. a fine-tune's base model, before the first step
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not (self.main and t.progress_bar),
                   desc=self.cfg.run.name, unit="step", dynamic_ncols=True)
        try:
            last_saved = self._train_until(end, bar)
        except RuntimeError as e:  # a collective failed: a peer died, froze or lost its network
            if self.acc.num_processes > 1 and is_peer_failure(e):
                raise GentrainError(
                    f"rank {self.acc.process_index}: a peer process stopped answering at step {self.step + 1} "
                    f"(dead or frozen rank, or network loss; train.process_group_timeout_s="
                    f"{t.process_group_timeout_s}): {str(e).splitlines()[0][:300]}") from None
            raise
        finally:
            bar.close()
            flush_trackers(self.acc)   # what was logged is on disk, a crash included
        if last_saved != self.step:
            self.save_checkpoint()
        if self.stopped_by:  # SIGUSR1/SIGTERM (stop.py): the stop_at exit, even at max_steps (resume evaluates)
            barrier(self.acc)
            self.acc.end_training()
            if self.main:
                where = ckpt.step_dir(ckpt.checkpoints_dir(self.run_dir), self.step)
                print(stop_message(self.stopped_by, self.step, where), file=sys.stderr)
            return {"step": self.step, "kimg": self.images / 1000, "stopped_early": 1.0,
                    "stopped_by_signal": self.stopped_by}
        if self.step < t.max_steps:  # stopped early at stop_at
            barrier(self.acc)
            self.acc.end_training()
            return {"step": self.step, "kimg": self.images / 1000, "stopped_early": 1.0}
        if not t.sample_every or self.step % t.sample_every:
            self.preview()
        results: dict[str, float] = {}
        with self.sampling_nets() as sampling:
            if sampling:
                results = evaluate(self.objective, self.cfg)
        if self.main:
            results["kimg"] = self.images / 1000
            results["step"] = self.step
            ckpt.save_json(self.run_dir / "eval.json", results)
            self.acc.log({k: v for k, v in results.items() if k.startswith("eval/")}, step=self.step)
        barrier(self.acc)
        self.acc.end_training()
        return results

    def _train_until(self, end: int, bar: tqdm) -> int:
        """Run steps up to `end`, logging, previewing and checkpointing on cadence; returns the
        step of the last checkpoint written."""
        t = self.cfg.train
        it = iter(self.stream)
        names = [ph.name for ph in self.phases]
        # running sums stay on the device: a .cpu() per step would wait for the optimizer's kernels
        zero = lambda: torch.zeros((), device=self.acc.device)  # noqa: E731
        sums, norms = {n: zero() for n in names}, {n: zero() for n in names}
        counts, extra = {n: 0 for n in names}, {}
        t0, img0, last_saved = time.perf_counter(), self.images, self.step
        while self.step < end:
            self.runtime.step = self.step
            for i, phase in enumerate(self.phases):
                if self.step % phase.every or self.step < phase.start:
                    continue
                for _ in range(self.objective.repeats(phase, self.step)):
                    loss, norm, logs = self._run_phase(i, it)
                    sums[phase.name] += loss
                    norms[phase.name] += norm.to(self.acc.device)
                    counts[phase.name] += 1
                    extra.update(logs)
            self.step += 1
            self._advance_schedules()
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == end:
                now = time.perf_counter()
                row: dict[str, Any] = {"kimg": self.images / 1000, "nan_skipped": self.nan_total,
                                       "images_per_s": (self.images - img0) / max(now - t0, 1e-9)}
                for i, n in enumerate(names):
                    if counts[n]:
                        row[f"loss/{n}"] = (sums[n] / counts[n]).item()
                        row[f"grad_norm/{n}"] = (norms[n] / counts[n]).item()
                    row[f"lr/{n}"] = self.schedulers[i].get_last_lr()[0]
                    sums[n].zero_(), norms[n].zero_()
                    counts[n] = 0
                row.update({k: float(v) for k, v in extra.items()})
                extra.clear()   # a lazily computed term (R1 every k steps) shows only in its own windows
                row.update({f"data/{k}": v for k, v in self.stream.stats().items()})
                if t.compile != "no":
                    row.update(fastpaths.compile_stats())
                self.acc.log(row, step=self.step)
                single = len(names) == 1
                bar.set_postfix({("loss" if single else k) if k.startswith("loss/") else "img/s": f"{v:.4g}"
                                 for k, v in row.items() if k.startswith("loss/") or k == "images_per_s"})
                t0, img0 = time.perf_counter(), self.images
            if t.sample_every and self.step % t.sample_every == 0:
                self.preview()
            snapshot_if_due(self.emas, self.backend, t, self.step, self.run_dir, self.main, self.objective.partial_nets)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save_checkpoint()
                last_saved = self.step
            if self._stop_agreed():
                break
        return last_saved

    def _advance_schedules(self) -> None:
        """Every phase's LR schedule to the current training step (a phase that has not started or
        skipped a non-finite step still follows the one clock)."""
        # torch warns only at a schedule's first step, when its optimizer has not stepped yet (a
        # delayed discriminator): catch_warnings there only (it costs ~20 µs a step and resets
        # every module's warning registry)
        if all(getattr(s, "_step_count", 0) > 1 for s in self.schedulers):
            for s in self.schedulers:
                while s.last_epoch < self.step:
                    s.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for s in self.schedulers:
                while s.last_epoch < self.step:
                    s.step()

    def _stop_agreed(self) -> bool:
        """True once a stop signal reached any rank; every rank then leaves after this same step."""
        self.stopped_by = max_over_ranks(self.acc, self.stop_signals.received or 0) or None
        return self.stopped_by is not None

    # ---- sampling with EMA weights --------------------------------------------------------------
    def full_emas(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective under DeepSpeed: every EMA whole, by parameter name."""
        return {n: self.backend.full_ema(n, ema.shadow_params) for n, ema in self.emas.items()}

    @contextmanager
    def sampling_nets(self):
        """Every rank enters (a collective gather under DeepSpeed); on the main process the
        objective then holds the unwrapped nets in eval mode with the EMA weights, restored
        afterwards. Yields whether this process samples."""
        wrapped = dict(self.objective.nets)
        with self.backend.sampling_nets(self.main, self.full_emas()) as nets:
            try:
                self.objective.nets.update(nets)
                yield self.main
            finally:
                self.objective.nets.update(wrapped)

    def preview(self) -> None:
        with self.sampling_nets() as sampling:
            if not sampling:
                return
            g = torch.Generator(self.acc.device).manual_seed(self.cfg.eval.seed)
            samples = self.objective.preview(generator=g)
            scores = self.objective.validation()
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        img = render(samples, self.objective.preview_captions, nrow=self.objective.preview_nrow)
        img.save(out / f"step_{self.step}.png")
        if scores:
            self.acc.log(scores, step=self.step)
        log_image(self.acc, "samples", img, self.step)   # the grid in TensorBoard too

    # ---- checkpoints (train/state.py) ------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state.save_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        state.load_checkpoint(self, path)
