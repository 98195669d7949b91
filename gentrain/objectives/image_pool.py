"""CycleGAN's image pool (Zhu et al. 2017, after Shrivastava et al. 2017): the discriminator is
updated on a history of generated images rather than only the latest ones."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


class ImagePool:
    """A buffer of up to ``size`` generated images. :meth:`query` takes a batch (B, C, H, W) and
    returns one of the same shape, image by image: while the pool is not full, the image is stored
    and returned; once full, with probability 1/2 a uniformly chosen stored image is returned and
    replaced by the new one, else the new image is returned. ``size=0`` returns the batch as it is.
    Returned images are detached (the pool feeds the discriminator's update only).

    The randomness comes from the caller: ``rand(n)`` must return n uniform draws on [0, 1) (e.g.
    ``lambda n: torch.rand(n, generator=g)`` or a ``BatchRNG``'s ``rand``), so the run's own RNG
    (and its checkpoint) drives the pool. A query with size > 0 calls ``rand(2 * B)`` exactly once,
    whether the pool is full or not: draw i < 0.5 replays for image i, draw B + i picks the slot
    ``floor(u * size)``. With :meth:`state_dict` saved beside that RNG's state, a resumed run
    continues bit for bit.
    """

    def __init__(self, size: int = 50):
        if size < 0:
            raise ValueError(f"ImagePool: size={size} must be >= 0")
        self.size = size
        self.images: Optional[Tensor] = None  # (n, C, H, W), n <= size

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    @torch.no_grad()
    def query(self, images: Tensor, rand: Callable[[int], Tensor]) -> Tensor:
        images = images.detach()
        if self.size == 0:
            return images
        b = len(images)
        u = rand(2 * b).detach().double().cpu().tolist()
        if len(u) != 2 * b:
            raise ValueError(f"ImagePool.query: rand({2 * b}) returned {len(u)} draws")
        if self.images is not None:
            if self.images.shape[1:] != images.shape[1:]:
                raise ValueError(f"ImagePool.query: images {tuple(images.shape[1:])} do not match the pool's "
                                 f"{tuple(self.images.shape[1:])}")
            self.images = self.images.to(images.device, images.dtype)
        out = []
        for i in range(b):
            img = images[i:i + 1]
            if len(self) < self.size:
                self.images = img.clone() if self.images is None else torch.cat([self.images, img])
                out.append(img)
            elif u[i] < 0.5:
                j = min(int(u[b + i] * self.size), self.size - 1)
                out.append(self.images[j:j + 1].clone())
                self.images[j] = img[0]
            else:
                out.append(img)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Tensor]:
        """{"images": (n, C, H, W)} on the CPU (a (0,) tensor when empty): tensors only, for safetensors."""
        return {"images": torch.zeros(0) if self.images is None else self.images.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        images = state["images"]
        if images.numel() == 0:
            self.images = None
            return
        if images.ndim != 4 or len(images) > self.size:
            raise ValueError(f"ImagePool.load_state_dict: images {tuple(images.shape)} do not fit a pool of "
                             f"{self.size} images (n, C, H, W)")
        self.images = images.clone()
