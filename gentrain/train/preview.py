"""Preview images: a grid for image samples, a density plot for 2-D points."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """(B, C, H, W) in [-1, 1] -> one PIL image with the samples on a grid."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if c == 1:
        x = x.expand(b, 3, h, w)
    grid = torch.full((3, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i, :3]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def density_plot(points: torch.Tensor, lim: float = 3.0, bins: int = 100) -> Image.Image:
    """(N, 2) points -> a log-density image of [-lim, lim]^2 (y up)."""
    p = points.detach().float().cpu().numpy()
    hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=bins, range=[[-lim, lim], [-lim, lim]])
    img = np.log1p(hist[::-1])
    img = (255 * (1 - img / max(img.max(), 1e-8))).astype(np.uint8)
    return Image.fromarray(img, mode="L").resize((4 * bins, 4 * bins), Image.NEAREST)


def render(samples: torch.Tensor, captions: list[str] | None = None, nrow: int | None = None) -> Image.Image:
    if samples.dim() == 2:  # points: [-3, 3]^2, or wider for data that reaches further (the 5x5 grid)
        reach = float(samples.detach().abs().float().quantile(0.99)) if samples.numel() else 0.0
        img = density_plot(samples, lim=max(3.0, 1.15 * reach))
    else:
        img = image_grid(samples, nrow=nrow)
    if samples.dim() == 4 and samples.shape[-1] < 64:  # small images: enlarge (nearest) to be seen
        k = 64 // samples.shape[-1]
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    if captions:
        img = _with_captions(img, captions)
    return img


def _with_captions(img: Image.Image, captions: list[str]) -> Image.Image:
    """The image with numbered captions below it (one per grid cell, in grid order)."""
    line_h = 12
    captions = [f"{i + 1}: {c}" for i, c in enumerate(captions)]
    width = max(img.width, 6 * max(len(c) for c in captions) + 4)
    out = Image.new("RGB", (width, img.height + line_h * len(captions) + 4), "white")
    out.paste(img.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(captions):
        draw.text((2, img.height + 2 + i * line_h), text, fill="black")
    return out
