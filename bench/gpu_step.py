"""One GPU check, ready for whenever a GPU machine is lent (issue 13): the UNet of the ldm_t2i_256
preset (SD 1.x's widths 320-640-1280-1280, 2 layers a block, 1,021 M parameters: gentrain's layout
has cross-attention at the three lower resolutions, where SD 1.x has it at the three higher), the
SD-1.5 UNet itself (diffusers' UNet2DConditionModel defaults with 768-wide text states, 860 M; the
net diffusers' train_text_to_image.py trains), both on 32x32x4 latents (256 px) and 77 x 768 text
states, and a DiT-B/2 at 256 px (32x32 latents, patch 2, 12 layers of 12 x 64), randomly initialised, on
synthetic latents and text states (the preset's hub autoencoder and CLIP cannot be fetched there),
in bf16: a bare loop and gentrain's Trainer around the same net, eager and torch.compile, and SD 1.5
trained the way diffusers' train_text_to_image.py does (VAE and CLIP encoding every step, against
gentrain's Trainer on cached latents: `gentrain_vs_diffusers`, target >= 1.3). Prints
one JSON object: images/s, step time, MFU against the bf16 matmul peak measured in the same run
and against the vendor's dense bf16 peak, peak memory.

On the GPU machine (python3 3.12 with torch 2.11, accelerate, transformers and peft; no diffusers,
webdataset or omegaconf; no network), with the wheels `make gpu-wheels` puts in .whl/ (6.5 MB,
ignored by git) carried along, the device tool's command is
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 timeout 540 python3 bench/gpu_step.py --out $OUT/gpu_step.json
On a CPU (and in CI, tests/train/test_gpu_step.py) `--tiny` runs the same code at tiny widths.

usage: python bench/gpu_step.py [--tiny] [--seconds 15] [--nets sd_unet,sd15_unet,dit_b2] [--variants ...] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)



def sd15_unet(c: int, s: int, dim: int, tiny: bool = False):
    """SD 1.5's UNet: diffusers' UNet2DConditionModel defaults (cross-attention at the three higher
    resolutions) with 768-wide text states; tiny: two blocks of 32 and 64 channels."""
    from diffusers import UNet2DConditionModel

    from gentrain.modeling.denoisers import ConditionalUNet

    kw = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")) if tiny else {}
    return ConditionalUNet.wrap(UNet2DConditionModel(sample_size=s, in_channels=c, out_channels=c,
                                                     cross_attention_dim=dim, **kw))


# name: (preset or builder, overrides of model.* or builder args, latent channels, latent size, batch,
# text dim (0: labels), tokens)
GPU_NETS = {
    "sd_unet": ("ldm_t2i_256", {}, 4, 32, 32, 768, 77),
    "sd15_unet": (sd15_unet, {}, 4, 32, 32, 768, 77),
    "dit_b2": ("dit_class_digits", {"dit_layers": 12, "dit_heads": 12, "dit_head_dim": 64, "patch_size": 2},
               4, 32, 64, 0, 0),
}
TINY_NETS = {
    "sd_unet": ("ldm_t2i_256", {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8},
                4, 8, 4, 32, 8),
    "sd15_unet": (sd15_unet, {"tiny": True}, 4, 8, 4, 32, 8),
    "dit_b2": ("dit_class_digits", {"dit_layers": 2, "dit_heads": 2, "dit_head_dim": 16, "patch_size": 2},
               4, 8, 4, 0, 0),
}


def diffusers_t2i_step(tiny: bool, batch: int, size: int, device: str):
    """The step of diffusers' examples/text_to_image/train_text_to_image.py on SD 1.5's nets,
    randomly initialised: accelerate (bf16 autocast), the frozen VAE and CLIP text encoder in bf16
    encoding every batch, DDPMScheduler.add_noise, the UNet, MSE, backward, clipping, AdamW, the
    LR schedule. Images (B, 3, 8*size, 8*size) and token ids are synthetic. Returns (step, run(n))."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    for st in (AcceleratorState, GradientState, PartialState):
        st._reset_state(*([True] if st is AcceleratorState else []))
    acc = Accelerator(mixed_precision="bf16")
    if tiny:
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=77))
        unet = sd15_unet(4, size, 32, tiny=True).model
    else:   # SD 1.5's configs: the VAE (83 M), CLIP ViT-L/14's text tower (123 M), the UNet (860 M)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
        unet = sd15_unet(4, size, 768).model
    vae.requires_grad_(False).to(device, torch.bfloat16)
    te.requires_grad_(False).to(device, torch.bfloat16)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    lr = get_scheduler("constant", optimizer=opt)
    unet, opt, lr = acc.prepare(unet, opt, lr)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 8 * size, 8 * size, generator=g).to(device)
    ids = torch.randint(0, te.config.vocab_size, (batch, 77), generator=g).to(device)

    def step():
        with acc.accumulate(unet):
            latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device).long()
            noisy = sched.add_noise(latents, noise, t)
            states = te(ids, return_dict=False)[0]
            pred = unet(noisy, t, states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr.step()
            opt.zero_grad()

    def run(n: int) -> None:
        for _ in range(n):
            step()
    return run


def diffusers_row(tiny: bool, nets: dict, device: str, seconds: float, res: dict) -> None:
    """SD 1.5 trained the way diffusers' script does it, beside gentrain's Trainer on the same UNet
    and batch with latents and text states cached (`gentrain data cache`): images/s and the ratio."""
    from step_speed import timed_chunks

    _, _, c, s, batch, _, _ = nets["sd15_unet"]
    first, step_s, n = timed_chunks(diffusers_t2i_step(tiny, batch, s, device), seconds, device, 1.0)
    row = {"net": "sd15_unet", "variant": "diffusers_train_text_to_image", "batch": batch, "steps_timed": n,
           "step_ms": round(step_s * 1e3, 2), "images_s": round(batch / step_s, 1), "first_step_s": round(first, 2)}
    ours = [r for r in res["rows"] if r["net"] == "sd15_unet" and r["variant"].startswith("trainer")]
    if ours:
        best = max(ours, key=lambda r: r["images_s"])
        row["gentrain_variant"] = best["variant"]
        row["gentrain_vs_diffusers"] = round(best["images_s"] / row["images_s"], 3)
    res["rows"].append(row)
    print(json.dumps(row), flush=True)


# NVIDIA's dense (no sparsity) bf16 tensor-core peaks, FLOP/s
VENDOR_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU, CI): the code path, not a figure")
    ap.add_argument("--nets", default="sd_unet,sd15_unet,dit_b2")
    ap.add_argument("--variants", default="bf16_autocast,trainer+bf16_autocast,bf16_autocast+compile,"
                                          "trainer+bf16_autocast+compile")
    ap.add_argument("--seconds", type=float, default=15.0, help="timed seconds per row after warm-up")
    ap.add_argument("--no-diffusers-row", action="store_true",
                    help="skip SD 1.5 trained as diffusers' train_text_to_image.py does (VAE + CLIP every step)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gpu_step.json"))
    a = ap.parse_args()
    sys.path[:0] = [ROOT, HERE]
    import torch

    from step_speed import run_net
    from gentrain.train.flops import matmul_peak

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    nets = TINY_NETS if a.tiny else GPU_NETS
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    # --tiny: a 512 matmul (a CPU without a bf16 kernel, AVX2 only, takes ~50 s for one 2048 bf16 matmul)
    size = {"n": 512, "seconds": 0.5} if a.tiny else {}
    peaks = {"fp32": matmul_peak(torch.float32, device=device, **size),
             "bf16": matmul_peak(torch.bfloat16, device=device, **size)}
    vendor = next((v for k, v in VENDOR_BF16.items() if k in name), None)
    if vendor:
        peaks["vendor_bf16"] = vendor
    res = {"device": name, "torch": torch.__version__, "tiny": a.tiny,
           "matmul_peak_tflops": {k: round(v / 1e12, 6) for k, v in peaks.items()}, "rows": []}
    t0 = time.time()
    for net in a.nets.split(","):
        run_net(net, a.variants.split(","), device, a.seconds, peaks, res, nets)
        if device == "cuda":
            torch.cuda.empty_cache()
    if "sd15_unet" in a.nets.split(",") and not a.no_diffusers_row:
        diffusers_row(a.tiny, nets, device, a.seconds, res)
    res["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
