"""`gentrain plan` for fine-tunes (launch/plan/pipelines.py): every part of the pretrained pipeline is
counted on the meta device from its config -- the published configs shipped for the presets' hub ids,
or a local folder's own -- with no network at all (sockets refused here), and the counts match the
published sizes."""
import json
import shutil
import socket

import pytest
import torch

from gentrain.config import load_config
from gentrain.errors import GentrainError
from gentrain.launch.plan.memory import make_plan
from gentrain.launch.plan.pipelines import CONFIG_DIR, part_builder, pipeline_folder

SD15, SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
SD35M, SD35L = "stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large"
FLUX = "black-forest-labs/FLUX.1-dev"
SANA = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
QWEN = "Qwen/Qwen-Image"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test (HF_HUB_OFFLINE aside: the plan must not try)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def count(hub_id: str, part: str) -> int:
    folder, _ = pipeline_folder(hub_id)
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        return sum(p.numel() for p in part_builder(folder, index, part)().parameters())


# Published sizes: SD-1.x UNet 859,520,964 and SDXL base UNet 2,567,463,684 (diffusers' counts, "860M" and
# "2.6B" in the papers); CLIP ViT-L/14's text tower 123,060,480 (+ its 768x768 projection in SD3);
# OpenCLIP bigG's text tower with projection 694,659,840; T5 v1.1 XXL's encoder 4,762,310,656; the
# SD / SDXL VAE 83,653,863 (SD3's, 16 latent channels and no quant convs, 83,819,683).
EXACT = [(SD15, "unet", 859_520_964), (SDXL, "unet", 2_567_463_684), (SD15, "text_encoder", 123_060_480),
         (SDXL, "text_encoder", 123_060_480), (SDXL, "text_encoder_2", 694_659_840), (SD15, "vae", 83_653_863),
         (SDXL, "vae", 83_653_863), (SD35M, "text_encoder", 123_060_480 + 768 * 768),
         (SD35M, "text_encoder_2", 694_659_840), (SD35M, "text_encoder_3", 4_762_310_656),
         (FLUX, "text_encoder", 123_060_480), (FLUX, "text_encoder_2", 4_762_310_656), (FLUX, "vae", 83_819_683)]


@pytest.mark.parametrize("hub_id, part, n", EXACT)
def test_shipped_configs_give_the_published_sizes(hub_id, part, n):
    assert count(hub_id, part) == n


def test_sd35_transformers_and_vae_match_the_published_figures():
    """Stability AI: SD3.5 Large 8.1B parameters, Medium 2.5B (MMDiT-X); diffusers builds the Medium
    transformer at 2.243B (the announcement's figure is rounded up: 10 % above it)."""
    assert round(count(SD35L, "transformer") / 1e9, 1) == 8.1
    medium = count(SD35M, "transformer")
    assert abs(medium / 2.5e9 - 1) < 0.12 and medium < count(SD35L, "transformer") / 3
    folder, _ = pipeline_folder(SD35M)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    assert count(SD35M, "vae") == count(SD35L, "vae") == 83_819_683


def test_flux_plans_offline_with_and_without_cached_encoders(capsys):
    """FLUX.1-dev: Black Forest Labs' "12 billion parameter rectified flow transformer" (diffusers builds it at
    11,901,408,320), T5-XXL 4.76B and CLIP-L counted from the shipped configs; `gentrain plan` prints both presets at
    8 x 80 GB and 1 x 24 GB with a row for a run on cached encodings (T5 unloaded: its bf16 bytes less)."""
    from gentrain.launch.cli import main

    n = count(FLUX, "transformer")
    assert round(n / 1e9) == 12 and round(n / 1e9, 1) == 11.9
    folder, _ = pipeline_folder(FLUX)
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    assert (cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"], cfg["in_channels"]) == (19, 38, True, 64)
    for preset in ("finetune_flux_lora", "finetune_flux_full"):
        for gpus, mem in ((8, 80), (1, 24)):
            plan = make_plan(load_config(preset), gpus, 1, gpu_memory=mem * 2**30)
            t5 = {f.name: f for f in plan.model.frozen}["text_encoder_2"]
            assert t5.params == 4_762_310_656 and plan.model.uncached_bytes == t5.bytes
            for s, row in plan.rows.items():   # cached: fits wherever the total less T5's bytes fits
                assert plan.fits(s, True) == (row["total"] - t5.bytes <= plan.usable), (preset, s)
            assert main(["plan", preset, "--gpus", str(gpus), "--gpu-memory", f"{mem}GB"]) == 0
            out = capsys.readouterr().out
            assert "FluxTransformer2DModel, 11,901.41M params" in out and "  encoders cached" in out, out[:400]
    lora8, lora1 = (make_plan(load_config("finetune_flux_lora"), g, 1, gpu_memory=m * 2**30) for g, m in ((8, 80), (1, 24)))
    assert lora8.fits("zero3") and not lora1.fits("ddp") and lora1.fits("zero3_offload")
    full8 = make_plan(load_config("finetune_flux_full"), 8, 1)
    assert not full8.fits("ddp") and full8.fits("zero3") and full8.rows["ddp"]["optimizer"] == 8 * n


def test_qwen_image_parts_match_the_published_figures():
    """Qwen-Image's model card: a 20B MMDiT; its encoder Qwen2.5-VL-7B-Instruct, 8.29B parameters (the hub's count of
    its safetensors, vision tower included); the VAE's per-channel statistics are diffusers' AutoencoderKLQwenImage
    defaults, which diffusers took from Qwen-Image."""
    import inspect

    import diffusers

    assert round(count(QWEN, "transformer") / 1e9) == 20
    assert round(count(QWEN, "text_encoder") / 1e9, 2) == 8.29
    folder, _ = pipeline_folder(QWEN)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    defaults = inspect.signature(diffusers.AutoencoderKLQwenImage.__init__).parameters
    assert vae["z_dim"] == 16 and all(vae[k] == defaults[k].default for k in ("latents_mean", "latents_std"))


def test_qwen_image_plans_offline_with_and_without_its_encoder():
    """8 x 80 GB and 1 x 24 GB: the 20.4B base frozen in bf16 (partitioned with its adapters under ZeRO-3), the
    8.29B VLM counted whole, and the 'encoders cached' row without it (a run on `gentrain data cache --pretrained`
    shards never loads it)."""
    from gentrain.launch.plan.memory import GIB, format_plan

    cfg = load_config("finetune_qwenimage_lora")
    big, small = make_plan(cfg, 8, 1), make_plan(cfg, 1, 1, gpu_memory=24 * GIB)
    frozen = {f.name: f for f in big.model.frozen}
    vlm, base = frozen["text_encoder"], frozen["transformer (frozen base)"]
    assert big.model.uncached_bytes == vlm.bytes >= 2 * 8.29e9 and base.sharded
    folder, _ = pipeline_folder(QWEN)
    with torch.device("meta"):
        bare = part_builder(folder, json.loads((folder / "model_index.json").read_text()), "transformer")()
    assert big.model.nets[0].trained == lora_targets_size(bare, cfg.model.lora.targets, cfg.model.lora.rank)
    assert big.fits("zero3") and big.rows["ddp"]["frozen"] - big.rows["zero3"]["frozen"] == pytest.approx(
        base.bytes * (1 - 1 / 8))
    # one 24 GB card: the bf16 base alone is 38 GiB; only CPU offload of it fits, with or without the VLM loaded
    assert not small.fits("ddp") and not small.fits("ddp", cached=True) and small.fits("zero3_offload")
    assert small.rows["zero3_offload"]["total"] - vlm.bytes < small.rows["zero3_offload"]["total"] / 5
    out = format_plan(small)
    assert "  encoders cached" in out and "gentrain data cache --pretrained Qwen/Qwen-Image" in out, out
    assert "'encoders cached'" not in format_plan(make_plan(load_config("finetune_sdxl_lora"), 8, 1))


def test_every_shipped_folder_names_its_source():
    readme = (CONFIG_DIR / "README.md").read_text()
    for folder in CONFIG_DIR.iterdir():
        if folder.is_dir():
            assert folder.name.replace("--", "/") in readme, folder.name


def lora_targets_size(net, targets, rank):
    """r (in + out) for every Linear whose name ends with one of the targets, as peft matches them."""
    return sum(rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def test_presets_plan_offline_lora_far_below_full():
    plans = {p: make_plan(load_config(p), 8, 1) for p in ("finetune_sdxl_lora", "finetune_sdxl_full",
                                                         "finetune_sd3_lora")}
    lora, full, sd3 = plans["finetune_sdxl_lora"], plans["finetune_sdxl_full"], plans["finetune_sd3_lora"]
    unet = full.model.nets[0]
    assert (unet.params, unet.trained) == (2_567_463_684, 2_567_463_684)
    # LoRA: the adapters peft puts on the UNet's attention projections train; the base is frozen in bf16
    adapters, frozen = lora.model.nets[0], {f.name: f for f in lora.model.frozen}
    folder, _ = pipeline_folder(SDXL)
    with torch.device("meta"):
        bare = part_builder(folder, json.loads((folder / "model_index.json").read_text()), "unet")()
    cfg = load_config("finetune_sdxl_lora")
    assert adapters.trained == adapters.params == lora_targets_size(bare, cfg.model.lora.targets, cfg.model.lora.rank)
    assert frozen["unet (frozen base)"].params == 2_567_463_684 and frozen["unet (frozen base)"].sharded
    assert frozen["unet (frozen base)"].bytes == 2 * 2_567_463_684 + sum(b.numel() * 2 for b in bare.buffers())
    assert frozen["text_encoder_2"].bytes == 2 * 694_659_840 + 8 * 77   # bf16, as the run's; + CLIP's int64 position ids
    for s in ("ddp", "zero2", "zero3"):
        assert lora.rows[s]["total"] < full.rows[s]["total"], s
    # trained state: 16 bytes/param under DDP for the full UNet, for the 5.8M adapters only under LoRA
    assert lora.rows["ddp"]["optimizer"] * 100 < full.rows["ddp"]["optimizer"]
    assert full.rows["ddp"]["optimizer"] == 8 * 2_567_463_684
    # ZeRO-3 partitions the frozen base with its net; DDP and ZeRO-2 keep it whole on every GPU
    base = frozen["unet (frozen base)"].bytes
    assert lora.rows["ddp"]["frozen"] - lora.rows["zero3"]["frozen"] == pytest.approx(base * (1 - 1 / 8))
    assert lora.rows["zero2"]["frozen"] == lora.rows["ddp"]["frozen"]
    # SD3.5 medium: the transformer's adapters on joint attention; T5 counted, with the note that it may stay unloaded
    (t5,) = [f for f in sd3.model.frozen if f.cls == "T5EncoderModel"]
    assert t5.params == 4_762_310_656 and any("can stay unloaded" in n for n in sd3.model.notes)
    assert 0 < sd3.model.nets[0].trained < 1e-2 * 2.24e9
    for plan in plans.values():
        assert plan.activations is None and any("activations not measured" in n for n in plan.model.notes)
    # text-encoder adapters: on both CLIPs (their base frozen, partitioned with them), never on T5
    te = make_plan(load_config("finetune_sd3_lora", ["model.text_encoder_lora.rank=4"]), 8, 1).model
    assert [n.name for n in te.nets] == ["transformer", "text_encoder", "text_encoder_2"]
    assert all(n.trained > 0 for n in te.nets) and te.nets[0].trained == sd3.model.nets[0].trained
    frozen = {f.name: f for f in te.frozen}
    assert frozen["text_encoder_2 (frozen base)"].params == 694_659_840 and frozen["text_encoder_2 (frozen base)"].sharded
    assert frozen["text_encoder_3"].params == 4_762_310_656 and not frozen["text_encoder_3"].sharded


def test_cli_prints_the_plan_offline(capsys):
    from gentrain.launch.cli import main

    assert main(["plan", "finetune_sdxl_lora", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "frozen unet (frozen base): UNet2DConditionModel, 2,567.46M params" in out and "ZeRO-3" in out
    assert "its published config, shipped with gentrain, not loaded" in out


@pytest.mark.parametrize("preset", ["finetune_sdxl_lora", "finetune_sdxl_full", "finetune_sd3_lora",
                                    "finetune_flux_lora", "finetune_flux_full", "finetune_sana_lora",
                                    "finetune_qwenimage_lora"])
def test_presets_validate_offline_with_the_real_hub_ids(preset, capsys, tmp_path, monkeypatch):
    """`gentrain train PRESET --dry-run` validates without loading anything (no network, no files written)."""
    from gentrain.launch.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"pretrained: {load_config(preset).model.pretrained}" in out and list(tmp_path.iterdir()) == []


def test_sana_configs_give_the_published_sizes_and_plan_offline_on_8x80_and_1x24(capsys):
    """Sana 1.6B (Xie et al. 2024, "Sana-1.6B"): diffusers builds its transformer at 1,604,462,752; Gemma-2-2B's
    2,024,517,888 non-embedding parameters (Gemma 2 report, Table 2) plus its 256,000 x 2,304 embedding; the
    DC-AE f32c32 (its name: 32x downsampling, 32 latent channels; scaling 0.41407) at 312,250,275. The LoRA
    plan: adapters on to_q/k/v only, the 1.6B base frozen in bf16, Gemma noted as loaded in every column."""
    from gentrain.launch.cli import main

    assert round(count(SANA, "transformer") / 1e9, 1) == 1.6 and count(SANA, "transformer") == 1_604_462_752
    assert count(SANA, "text_encoder") == 2_024_517_888 + 256_000 * 2_304
    folder, _ = pipeline_folder(SANA)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], 2 ** (len(vae["encoder_block_out_channels"]) - 1)) == (32, 32)
    assert count(SANA, "vae") == 312_250_275
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        bare = part_builder(folder, index, "transformer")()
    cfg = load_config("finetune_sana_lora")
    for gpus, mem in ((8, 80), (1, 24)):
        plan = make_plan(load_config("finetune_sana_lora"), gpus, 1, gpu_memory=mem * 2**30)
        adapters, frozen = plan.model.nets[0], {f.name: f for f in plan.model.frozen}
        assert adapters.trained == lora_targets_size(bare, cfg.model.lora.targets, cfg.model.lora.rank)
        assert frozen["transformer (frozen base)"].params == 1_604_462_752 and frozen["text_encoder"].cls == "Gemma2Model"
        assert any("text_encoder (Gemma2Model, 2.61B params" in n and "stays loaded" in n for n in plan.model.notes)
        assert plan.fits("ddp") and plan.fits("zero3"), (gpus, plan.rows["ddp"]["total"])
    with pytest.raises(GentrainError, match="'model.text_encoder_lora.rank': SanaPipeline's load_lora_weights takes"):
        make_plan(load_config("finetune_sana_lora", ["model.text_encoder_lora.rank=4"]), 1, 1)
    assert main(["plan", "finetune_sana_lora", "--gpus", "1", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "frozen text_encoder: Gemma2Model, 2,614.34M params" in out and "fits 24 GiB" in out


def test_a_local_folder_is_planned_from_its_own_configs(tmp_path):
    """A folder with model_index.json (no weights needed): its own configs, not the shipped ones."""
    folder = tmp_path / "tiny_sd"
    shutil.copytree(CONFIG_DIR / SD15.replace("/", "--"), folder)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    unet_cfg.update(block_out_channels=[32, 64, 64, 64], norm_num_groups=32, attention_head_dim=4)
    (folder / "unet" / "config.json").write_text(json.dumps(unet_cfg))
    import diffusers

    with torch.device("meta"):
        n = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_config(unet_cfg).parameters())
    plan = make_plan(load_config("finetune_t2i", [f"model.pretrained={folder}"]), 2, 1)
    (unet,) = plan.model.nets
    assert unet.params == unet.trained == n and unet.ema          # the preset keeps an EMA
    assert all(f.source == "config of the local folder" for f in plan.model.frozen)
    for ema in (["train.ema_decay=0"], ["train.ema_decay=0", "train.ema=posthoc"]):   # none; post-hoc profiles
        posthoc = make_plan(load_config("finetune_t2i", [f"model.pretrained={folder}", *ema]), 2, 1, measure=False)
        assert posthoc.model.nets[0].ema == (len(ema) == 2)


def test_a_cached_hub_id_is_planned_from_the_cached_configs(tmp_path, monkeypatch):
    """A hub id gentrain ships no configs for, in the local Hugging Face cache (configs only)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--cached-sd"
    shutil.copytree(CONFIG_DIR / SD15.replace("/", "--"), repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    plan = make_plan(load_config("finetune_t2i_lora", ["model.pretrained=someone/cached-sd"]), 1, 1)
    assert plan.model.frozen[0].params == 859_520_964          # the UNet's frozen base
    assert all(f.source == "config in the local Hugging Face cache, not loaded" for f in plan.model.frozen)


@pytest.mark.parametrize("edit, needle", [
    (lambda idx: idx.update(_class_name="AuraFlowPipeline"), "is a AuraFlowPipeline; fine-tuning takes a StableDiffusionPipeline"),
    (lambda idx: idx.pop("unet"), "names no unet"),
])
def test_other_pipelines_are_refused_in_one_line(tmp_path, edit, needle):
    folder = tmp_path / "p"
    shutil.copytree(CONFIG_DIR / SD15.replace("/", "--"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    edit(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(GentrainError) as e:
        make_plan(load_config("finetune_t2i_lora", [f"model.pretrained={folder}"]), 1, 1)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_hub_id_names_the_shipped_ones():
    with pytest.raises(GentrainError) as e:
        make_plan(load_config("finetune_t2i_lora", ["model.pretrained=someone/not-shipped"]), 1, 1)
    msg = str(e.value)
    assert "'model.pretrained'" in msg and SDXL in msg and SD35L in msg and "\n" not in msg


def test_the_families_table_lists_every_supported_pipeline_class():
    """docs/families.md's finetune row names every class a pipeline adapter serves (objectives/adapters)."""
    from pathlib import Path

    from gentrain.objectives.adapters import ADAPTERS

    row = next(line for line in (Path(__file__).parents[2] / "docs" / "families.md").read_text().splitlines()
               if line.startswith("| `finetune` |"))
    assert all(f"`{name}`" in row for name in ADAPTERS), [n for n in ADAPTERS if f"`{n}`" not in row]
