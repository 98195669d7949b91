"""Activation memory of one training micro-step, measured for real on CPU at a few small batch
sizes (every live tensor storage tracked by a dispatch mode) and scaled linearly to the planned batch."""
from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from gentrain.launch.plan.footprint import Model

AUTO_SECOND_POINT_S = 15  # measure-batches auto: batches 2 and 4 only when batch 1 took less than this (s)


class LiveTensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages created inside the context that are still alive, and their peak.

    CPU torch keeps no allocator statistics, so each op's output storages are recorded (one that
    is none of the op's inputs' storages is new; views and in-place results are not) and released
    by a weakref callback when freed: what ``torch.cuda.memory_allocated`` counts, less the caching
    allocator's rounding. Storages resized in place (``UntypedStorage.resize_``: FSDP2 frees its
    gathered parameters to 0 bytes after use and re-grows them for the next all-gather) count at
    their new size; tensor subclasses (DTensor) count by their inner tensors. Not seen: workspaces
    an op frees before returning, tensors made on other threads. Every birth, resize and release is
    logged, so the peak can be recomputed without some storages (the grads, counted apart), with
    the casts of ``nn.Parameter``s (autocast's bf16 weight copies) live at that peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.events: list[tuple[int, int, bool]] = []             # (storage serial, +/- bytes, weight copy)
        self._born: dict[int, list[Any]] = {}    # storage address -> [serial, weakref, bytes now, weight copy]

    def _count(self, key: int, serial: int, nbytes: int, copy: bool) -> None:
        self.events.append((serial, nbytes, copy))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _birth(self, st: torch.UntypedStorage, copy: bool) -> None:
        key, n, serial = st._cdata, st.nbytes(), len(self.events)
        self._born[key] = [serial, weakref.ref(st, functools.partial(self._release, key)), n, copy]
        self._count(key, serial, n, copy)

    def _release(self, key: int, _ref: Any = None) -> None:
        serial, _, n, copy = self._born.pop(key)
        self._count(key, serial, -n, copy)

    def _resized(self, st: torch.UntypedStorage) -> None:
        """A storage resized in place: the difference, or a birth if it was not seen (and grows)."""
        rec = self._born.get(st._cdata)
        if rec is None:
            if st.nbytes():
                self._birth(st, False)
            return
        delta, rec[2] = st.nbytes() - rec[2], st.nbytes()
        self._count(st._cdata, rec[0], delta, rec[3])

    def __enter__(self) -> "LiveTensorMemory":
        resize = torch._C.StorageBase.resize_

        def counted_resize(st: torch.UntypedStorage, size: int) -> Any:
            out = resize(st, size)
            self._resized(st)
            return out
        torch.UntypedStorage.resize_ = counted_resize   # the class's own attribute shadows StorageBase's
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        del torch.UntypedStorage.resize_
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _plain(tree_leaves((args, kwargs)))}
        copy = func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter)
        for t in _plain(tree_leaves(out)):
            st = t.untyped_storage()
            if st._cdata not in inputs and st._cdata not in self._born:
                self._birth(st, copy)
        return out

    def peak_without(self, tensors: list[torch.Tensor]) -> tuple[int, int]:
        """(peak live bytes had these live tensors' storages never been counted, weight copies live at it)."""
        keys = (t.untyped_storage()._cdata for t in _plain(tensors))
        skip = {self._born[k][0] for k in keys if k in self._born}
        live = copies = peak = at_peak = 0
        for serial, n, copy in self.events:
            if serial in skip:
                continue
            live, copies = live + n, copies + (n if copy else 0)
            if live > peak:
                peak, at_peak = live, copies
        return peak, at_peak


def _plain(leaves: list[Any]) -> list[torch.Tensor]:
    """The strided tensors among `leaves`, a tensor subclass (DTensor) replaced by its inner tensors."""
    out = []
    for t in leaves:
        if is_traceable_wrapper_subclass(t):
            out += _plain([getattr(t, a) for a in t.__tensor_flatten__()[0]])
        elif _strided(t):
            out.append(t)
    return out


def _strided(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


@dataclass
class Series:
    """Peak bytes measured at a few batch sizes; a line through the last two (or one point) scales them."""
    batch_sizes: list[int]
    peaks: list[int]
    fixed_floor: int = 0      # one point: the part known not to grow with the batch

    @property
    def per_sample(self) -> float:
        if len(self.batch_sizes) == 1:
            return max(0.0, (self.peaks[0] - self.fixed_floor) / self.batch_sizes[0])
        (b0, b1), (m0, m1) = self.batch_sizes[-2:], self.peaks[-2:]
        return max(0.0, (m1 - m0) / (b1 - b0))

    @property
    def fixed(self) -> float:
        if len(self.batch_sizes) == 1:
            return float(self.fixed_floor)
        return max(0.0, self.peaks[-1] - self.per_sample * self.batch_sizes[-1])

    def at(self, batch: int) -> int:
        return int(self.fixed + self.per_sample * batch)


@dataclass
class Activations:
    step: Series                  # the micro-step's live peak, its grads left out (the grads row has them)
    weight_copies: int            # autocast's casts of parameters live at that peak (largest batch), bytes
    seconds: float
    encode: Optional[Series] = None   # the frozen helpers' no-grad forward, when measured apart

    def at(self, batch: int, less_weight_copies: bool = False) -> int:
        """Activation bytes at a batch: the larger of the step's and the helpers' forward."""
        step = self.step.at(batch) - (self.weight_copies if less_weight_copies else 0)
        return max(step, self.encode.at(batch) if self.encode else 0)

    def describe(self) -> list[str]:
        """How each series was measured and scaled, one line each."""
        def line(x: Series, fixed: str) -> str:
            at = f"at batch {', '.join(map(str, x.batch_sizes))}"
            how = (f"line through {x.batch_sizes[-2]} and {x.batch_sizes[-1]}" if len(x.batch_sizes) > 1 else
                   f"one point, {fixed}, the rest proportional to the batch" if fixed else
                   "one point, proportional to the batch")
            return f"{at}, {how}: {x.fixed / 2**20:.1f} MiB + {x.per_sample / 2**20:.3f} MiB/sample"

        out = [f"micro-step {line(self.step, 'fixed part = autocast weight copies live at the peak')}"]
        if self.encode:
            out.append(f"frozen helpers' no-grad forward (uncached batches) {line(self.encode, '')}; "
                       "the larger of the two counts")
        return out


def _series(run: Callable[[int], None], sizes: list[int], auto: bool, after: Callable[[LiveTensorMemory], tuple[int, int]],
            ) -> tuple[Series, int]:
    """Peaks of run(b) at each size (auto: stop after the first if it was slow), and the last weight copies."""
    peaks, copies, t0 = [], 0, time.perf_counter()
    for i, b in enumerate(sizes):
        if auto and i == 1 and time.perf_counter() - t0 > AUTO_SECOND_POINT_S:
            sizes = sizes[:1]
            break
        with LiveTensorMemory() as mem:
            run(b)
        peak, copies = after(mem)
        peaks.append(peak)
    return Series(list(sizes), peaks, copies if len(sizes) == 1 else 0), copies


def measure_activations(model: Model, batch_sizes: Optional[list[int]], warmup: bool = True) -> Activations:
    """Peak live tensor bytes of one micro-step (batch, forward, loss, backward), its grads left out
    (the grads row counts them), at each batch size; the last two fix a line. None = auto: batch 1,
    then 2 and 4 unless batch 1 took over AUTO_SECOND_POINT_S (kernels at batch 1 can differ: the
    line through 1 and 2 overshot the one through 32 and 64 by 7% on a UNet here)."""
    sizes, auto = list(batch_sizes or [1, 2, 4]), batch_sizes is None
    model.trained()   # built (and initialised) before anything is tracked: weights are no activations
    if warmup:   # lazy state (cached "" embedding, preview batch) must not count as the first batch's
        model.step(sizes[0])
        model.zero_grad()
    t0 = time.perf_counter()

    def without_grads(mem: LiveTensorMemory) -> tuple[int, int]:
        out = mem.peak_without(model.grads())
        model.zero_grad()
        return out

    step, copies = _series(model.step, sizes, auto, without_grads)
    encode = _series(model.encode, step.batch_sizes, False, lambda mem: (mem.peak, 0))[0] if model.encode else None
    return Activations(step, copies, time.perf_counter() - t0, encode)
