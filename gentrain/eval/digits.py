"""Offline evaluator for models trained on scikit-learn's ``load_digits``: a tiny CPU CNN
classifier fitted on the real digits, whose penultimate features give a Frechet distance (FD).

Every figure here is computed with *this small digits classifier*, not Inception: the FD is a
"digits-classifier FD", comparable only with other FDs from an evaluator of the same size and
seed (and beside ``fd_real_vs_real``, the FD between two disjoint real sets of the same N).
It is NOT the Inception FID of the literature."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "gentrain.digits_evaluator/1"
N_DIGITS = 1797


def real_digits(size: int, channels: int = 1, shard_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 real digits exactly as the training batches hold them: (N, C, size, size)
    float32 in [-1, 1] (white ink on black) and (N,) int64 labels. The images are the PNGs
    of :func:`~gentrain.data_pipeline.sources.digits_samples` (8x8 -> bicubic, grey), decoded
    like the data pipeline (L -> RGB for 3 channels, x / 127.5 - 1). ``shard_size``: the size
    the shards were written at, when the pipeline resizes them (bicubic) to ``size``."""
    x, y = _real_digits(size, channels, shard_size)
    return x.clone(), y.clone()


@functools.lru_cache(maxsize=8)
def _real_digits(size: int, channels: int, shard_size: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    import io

    from PIL import Image

    from gentrain.data_pipeline.transforms import images_to_tensor, image_array, resize_crop, to_channels
    from gentrain.data_pipeline.sources import digits_samples

    arrays, labels = [], []
    for s in digits_samples(size=shard_size or size, seed=0):
        im = to_channels(Image.open(io.BytesIO(s["png"])), channels)
        arrays.append(image_array(resize_crop(im, size, size, None), flip=False))
        labels.append(json.loads(s["json"])["label"])
    return images_to_tensor(arrays), torch.tensor(labels, dtype=torch.int64)


def _grey(images: Any) -> torch.Tensor:
    """(N, 1, H, W) float32 clamped to [-1, 1]; 3-channel input is averaged to grey."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).detach().cpu().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (N, C, H, W) with C=1 or 3, got {tuple(x.shape)}")
    return x.mean(1, keepdim=True).clamp(-1, 1)


def _split(labels: torch.Tensor, seed: int, frac: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (train, held-out) index split, deterministic for ``seed``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    train, held = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(len(idx) * frac)
        held.append(idx[:k]), train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


class _Net(nn.Module):
    """Three conv blocks (16, 32, 64 channels; 2x2 max-pool while the map is over 4 px; the first
    conv strided while over 16 px, so 32 px costs about what 16 px does), then
    a 64-d linear feature layer (the FD features, pre-ReLU) and a 10-way head."""

    def __init__(self, size: int, feat: int = 64):
        super().__init__()
        layers, ch, s = [], 1, size
        for w in (16, 32, 64):
            stride = 2 if s > 16 else 1  # over 16 px: a strided 4x4 conv first (no full-res 16->32 conv)
            layers += [nn.Conv2d(ch, w, 3 if stride == 1 else 4, stride=stride, padding=1), nn.ReLU()]
            s //= stride
            if s > 4:
                layers.append(nn.MaxPool2d(2))
                s //= 2
            ch = w
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.feat = nn.Linear(64 * s * s, feat)
        self.head = nn.Linear(feat, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


@contextlib.contextmanager
def _one_thread():
    """Tiny convs: one thread is as fast, never stalls on a busy box, and sums the same anywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small random affine jitter: shifts up to 1/8 of the size, +-10 degrees, scale 0.9..1.1."""
    n = x.shape[0]
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    ang, sc = r(-math.pi / 18, math.pi / 18), r(0.9, 1.1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
    theta[:, :, 2] = torch.stack([r(-0.25, 0.25), r(-0.25, 0.25)], 1)  # 1/8 of the size (grid spans 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding = black background


def frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the trace term from the eigenvalues of the
    symmetric PSD S1^1/2 S2 S1^1/2 (no complex sqrtm, stable for near-singular S)."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())
    return max(fd, 0.0)


class DigitsEvaluator:
    """A fitted digits classifier at one resolution. ``accuracy`` is its held-out accuracy
    (20% stratified split of the 1,797 digits). FD figures are on its 64-d features, not Inception."""

    def __init__(self, net: _Net, size: int, seed: int, accuracy: float, shard_size: Optional[int] = None):
        self.net, self.size, self.seed, self.shard_size = net.eval(), size, seed, shard_size
        self.accuracy, self.fit_seconds = accuracy, 0.0
        self._real: Optional[torch.Tensor] = None

    @classmethod
    def fit(cls, size: int, seed: int = 0, epochs: int = 20, shard_size: Optional[int] = None) -> "DigitsEvaluator":
        """Train on 80% of the real digits at ``size`` px (deterministic for ``seed``: one thread,
        seeded init, split, order and augmentation); score on the held-out 20%."""
        t0 = time.perf_counter()
        x, y = real_digits(size, 1, shard_size)
        tr, held = _split(y, seed)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _Net(size)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * math.ceil(len(tr) / 64))
        with _one_thread(), torch.enable_grad():  # callers may be inside no_grad (end-of-run eval)
            for _ in range(epochs):
                perm = tr[torch.randperm(len(tr), generator=g)]
                for i in range(0, len(perm), 64):
                    b = perm[i:i + 64]
                    loss = F.cross_entropy(net(_augment(x[b], g)), y[b])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        ev = cls(net, size, seed, 0.0, shard_size)
        ev.accuracy = float((ev.predict(x[held]) == y[held]).float().mean())
        ev.fit_seconds, ev._real = time.perf_counter() - t0, x
        return ev

    @classmethod
    def cached(cls, path: str, size: int, seed: int = 0, shard_size: Optional[int] = None) -> "DigitsEvaluator":
        """Load ``path`` if it holds an evaluator for (size, seed, shard_size); else fit and save one."""
        if os.path.exists(path):
            ev = cls.load(path)
            if (ev.size, ev.seed, ev.shard_size) == (size, seed, shard_size):
                return ev
        ev = cls.fit(size, seed, shard_size=shard_size)
        ev.save(path)
        return ev

    def _check(self, images: Any) -> torch.Tensor:
        x = _grey(images)
        if tuple(x.shape[2:]) != (self.size, self.size):
            raise ValueError(f"images are {tuple(x.shape[2:])} px; the evaluator is fitted at {self.size}x{self.size}")
        return x

    @torch.no_grad()
    def features(self, images: Any) -> torch.Tensor:
        """(N, 64) penultimate (pre-ReLU) features of (N, C, size, size) images in [-1, 1] (values
        outside are clamped; 3 channels are averaged to grey)."""
        x = self._check(images)
        with _one_thread():
            return torch.cat([self.net.features(c) for c in x.split(512)]) if len(x) else torch.zeros(0, 64)

    @torch.no_grad()
    def predict(self, images: Any) -> torch.Tensor:
        """(N,) predicted digit labels."""
        return self.net.head(F.relu(self.features(images))).argmax(1)

    def frechet_distance(self, images_a: Any, images_b: Any, eps: float = 1e-6) -> float:
        """FD between Gaussian fits of this classifier's features of two image sets (not Inception
        FID); ``eps`` on the covariance diagonals keeps small N well-posed."""
        stats = []
        for imgs in (images_a, images_b):
            f = self.features(imgs).double().numpy()
            if len(f) < 2:
                raise ValueError("frechet_distance needs at least 2 images per set")
            stats += [f.mean(0), np.cov(f, rowvar=False) + eps * np.eye(f.shape[1])]
        return frechet(*stats)

    def real_images(self) -> torch.Tensor:
        if self._real is None:
            self._real = real_digits(self.size, 1, self.shard_size)[0]
        return self._real

    def _real_pair(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 2 <= n <= N_DIGITS // 2:
            raise ValueError(f"n={n}: need 2 <= n <= {N_DIGITS // 2} for two disjoint real sets")
        perm = torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(seed))
        x = self.real_images()
        return x[perm[:n]], x[perm[n:2 * n]]

    def real_vs_real_fd(self, n: int, seed: int = 0) -> float:
        """FD between two disjoint random sets of n real digits: the floor for N = n. FD is biased
        upwards at small N (about 5x at N=100 vs N=500), so compare figures only at equal N."""
        return self.frechet_distance(*self._real_pair(n, seed))

    def evaluate_images(self, images: Any, labels: Any = None, n_ref: Optional[int] = None,
                        seed: int = 0) -> dict[str, float]:
        """{"fd": FD(images, n_ref real), "fd_real_vs_real": FD(that real set, a disjoint one),
        "accuracy": share of images classified as ``labels`` (if given), "classifier_heldout_accuracy"}.
        n_ref defaults to len(images), at most 898. Digits-classifier FD, not Inception FID."""
        n = min(n_ref or len(images), N_DIGITS // 2)
        ref_a, ref_b = self._real_pair(n, seed)
        out = {"fd": self.frechet_distance(images, ref_a), "fd_real_vs_real": self.frechet_distance(ref_b, ref_a),
               "classifier_heldout_accuracy": self.accuracy, "n": float(len(images)), "n_ref": float(n)}
        if labels is not None:
            out["accuracy"] = float((self.predict(images) == torch.as_tensor(labels).flatten().cpu()).float().mean())
        return out

    def save(self, path: str) -> None:
        """One safetensors file: the weights, with the settings as JSON in its metadata."""
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "size": self.size, "seed": self.seed, "accuracy": self.accuracy,
                "shard_size": self.shard_size}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, path, metadata={"gentrain": json.dumps(meta)})

    @classmethod
    def load(cls, path: str) -> "DigitsEvaluator":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("gentrain", "{}"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file")
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = _Net(int(meta["size"]))
        net.load_state_dict(state)
        return cls(net, int(meta["size"]), int(meta["seed"]), float(meta["accuracy"]), meta.get("shard_size"))


@functools.lru_cache(maxsize=4)
def default_evaluator(size: int, seed: int = 0) -> DigitsEvaluator:
    """The evaluator at ``size`` px, fitted once per process (a few seconds) and then reused."""
    return DigitsEvaluator.fit(size, seed)


def evaluate_images(images: Any, labels: Any = None, n_ref: Optional[int] = None, seed: int = 0,
                    evaluator: Optional[DigitsEvaluator] = None) -> dict[str, float]:
    """:meth:`DigitsEvaluator.evaluate_images` with ``evaluator``, else :func:`default_evaluator` at
    the images' size. Digits-classifier FD, not Inception FID."""
    ev = evaluator or default_evaluator(int(_grey(images).shape[-1]))
    return ev.evaluate_images(images, labels, n_ref, seed)
