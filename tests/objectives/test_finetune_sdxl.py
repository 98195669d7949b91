"""Fine-tuning a StableDiffusionXLPipeline (family `finetune`, the SDXL pipeline adapter) on the tiny
SDXL pipeline of tiny_pipelines_sdxl.py: LoRA on the UNet and both CLIPs through the CLI with the
preset every pipeline class shares, a bitwise resume, the export in diffusers' and kohya's formats
reloaded by stock diffusers in a fresh process that never imports gentrain (drawing what gentrain
draws), SDXL's add_time_ids from each sample's json and crop, and a class no adapter serves refused."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import cli_env, ok, read_metrics, run_cli
from tiny_pipelines_sdxl import tiny_sdxl  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.finetune

COMMON = ["data.image_size=16", "data.channels=1", "data.num_workers=0", "data.random_flip=false",
          "train.mixed_precision=no", "train.batch_size=8", "train.grad_accum=1", "train.log_every=1",
          "train.progress_bar=false", "train.warmup_steps=0", "model.sample_steps=3", "model.validation_samples=8",
          "model.gradient_checkpointing=false", "model.validation_prompts=['a 3', 'a 7']", "run.trackers=[]",
          "eval.num_samples=8", "train.ema_decay=0"]
LORA = ["model.lora.rank=4", "model.lora.alpha=2", "model.text_encoder_lora.rank=2", "model.text_encoder_lora.alpha=8",
        "train.lr=1e-2", "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=4"]

FRESH = """
import json, sys, torch
from diffusers import StableDiffusionXLPipeline
base, out, prompts = sys.argv[1], sys.argv[2], ["a 3", "a 7"]
def draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompts, height=16, width=16, num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
def with_lora(weight_name=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(out, **({"weight_name": weight_name} if weight_name else {}))
    return pipe
unet_only = StableDiffusionXLPipeline.from_pretrained(base)
unet_only.unet.load_lora_adapter(out, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
imgs = {"base": draw(StableDiffusionXLPipeline.from_pretrained(base)), "lora": draw(with_lora()),
        "kohya": draw(with_lora("pytorch_lora_weights_kohya.safetensors")), "unet_only": draw(unet_only)}
torch.save(imgs, out + "/fresh.pt")
print(json.dumps(sorted(m for m in sys.modules if m.startswith("gentrain"))))
"""


def losses(run_dir):
    return {r["step"]: r["loss/main"] for r in read_metrics(run_dir) if "loss/main" in r}


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, tmp_path_factory):
    """One LoRA run straight to step 4, one stopped at 2 and resumed, and the first one's export."""
    root, pipe = tiny_sdxl
    tmp = tmp_path_factory.mktemp("sdxl_runs")
    args = ["train", "finetune_t2i_lora", f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON, *LORA,
            f"run.output_dir={tmp}"]
    ok(run_cli(*args, "run.name=straight", "run.trackers=[tensorboard]"))
    assert run_cli(*args, "run.name=split", "--stop-at", "2").returncode == 0
    ok(run_cli(*args, "run.name=split", "--resume", "auto"))
    ok(run_cli("export", str(tmp / "straight"), "--out", str(tmp / "export")))
    return tmp, pipe


def test_lora_on_unet_and_both_clips_trains_and_resumes_bitwise(lora_run):
    tmp, _ = lora_run
    run = tmp / "straight"
    ck = run / "checkpoints" / "step_4"
    files = sorted(ck.glob("model*.safetensors"))
    assert len(files) == 3, files   # the UNet's and both CLIPs' adapters, and only adapters
    for f in files:
        with safe_open(str(f), "pt") as h:
            keys = list(h.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), (f.name, keys[:5])
    val = {r["step"]: r["val/loss"] for r in read_metrics(run) if "val/loss" in r}
    assert sorted(val) == [0, 4] and val[4] < val[0], val
    assert "size_crop: true" in (run / "config.yaml").read_text()   # the reader fed SDXL's micro-conditioning
    a, b = losses(run), losses(tmp / "split")
    assert all(a[s] == b[s] for s in (3, 4)), (a, b)
    for f in files:   # the adapters of every net, bit for bit
        assert f.read_bytes() == (tmp / "split" / "checkpoints" / "step_4" / f.name).read_bytes(), f.name


def test_validation_grids_draw_the_prompts_through_the_adapter_beside_the_base_drawn_once(lora_run):
    """Every train.sample_every steps and before the first: the validation prompts drawn through the SDXL
    pipeline, captioned, in samples/ and TensorBoard; the first row is the base (stock
    StableDiffusionXLPipeline, same seed, its own guidance 5.0), drawn once and the same at every step; the
    second row the current model, which moves as the adapters train."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, pipe = lora_run
    run = tmp / "straight"
    grids = {s: np.asarray(Image.open(run / "samples" / f"step_{s}.png").convert("L")).astype(int) for s in (0, 4)}
    k, pad = 4, 2   # 16-px cells on a grid with 2-px gaps, enlarged 4x (render: small images)

    def cell(grid, row, col):
        y, x = (pad + row * (16 + pad)) * k, (pad + col * (16 + pad)) * k
        return grid[y:y + 16 * k:k, x:x + 16 * k:k]

    height = (pad + 2 * (16 + pad)) * k
    assert grids[0].shape[0] > height and (grids[0][height:] < 128).any()   # the numbered captions below the grid
    stock = StableDiffusionXLPipeline.from_pretrained(str(pipe))
    stock.set_progress_bar_config(disable=True)
    base = stock(prompt=["a 3", "a 7"], height=16, width=16, num_inference_steps=3, output_type="pt",
                 generator=torch.Generator().manual_seed(1234)).images   # eval.seed; guidance: the pipeline's default
    base = ((base * 2 - 1).clamp(-1, 1) + 1) * 127.5
    for col in range(2):
        want = base[col, 0].round().int().numpy()
        assert np.abs(cell(grids[0], 0, col) - want).max() <= 1, col          # the base row is stock diffusers'
        assert np.array_equal(cell(grids[4], 0, col), cell(grids[0], 0, col))   # drawn once, kept
        assert np.array_equal(cell(grids[0], 1, col), cell(grids[0], 0, col))   # untrained adapters: the base
        assert np.abs(cell(grids[4], 1, col) - cell(grids[0], 1, col)).mean() > 1   # trained: moved
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [0, 4]


def test_lora_export_loads_in_stock_diffusers_and_draws_what_gentrain_draws(lora_run):
    tmp, pipe = lora_run
    out = tmp / "export"
    info = json.loads((out / "gentrain_export.json").read_text())
    assert info["kind"] == "lora" and info["pipeline_class"] == "StableDiffusionXLPipeline" and info["kohya_file"], info
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as h:
        keys, meta = list(h.keys()), json.loads(h.metadata()["lora_adapter_metadata"])
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}, sorted(keys)[:5]
    # the first CLIP's last layer, whose output SDXL never reads, has no adapters (no gradient: DDP would refuse)
    last = [k for k in keys if ".layers.1." in k]
    assert last and not [k for k in last if k.startswith("text_encoder.")], last
    assert meta["unet.lora_alpha"] == 2 and meta["text_encoder.lora_alpha"] == 8 and meta["text_encoder_2.lora_alpha"] == 8
    with safe_open(str(out / "pytorch_lora_weights_kohya.safetensors"), "pt") as h:
        alphas = {(k.split("_")[1], float(h.get_tensor(k))) for k in h.keys() if k.endswith(".alpha")}
    assert alphas == {("unet", 2.0), ("te1", 8.0), ("te2", 8.0)}, alphas   # kohya's prefixes, the true alphas

    from gentrain.train.runs import load_trained

    _, objective, _ = load_trained(tmp / "straight")
    mine = (objective.sample(2, {"prompts": ["a 3", "a 7"]}, generator=torch.Generator().manual_seed(0), steps=3,
                             guidance_scale=3.0) + 1) / 2
    assert mine.shape == (2, 1, 16, 16) and torch.isfinite(mine).all()
    r = subprocess.run([sys.executable, "-c", FRESH, str(pipe), str(out)], capture_output=True, text=True,
                       timeout=300, env=cli_env())
    ok(r)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []   # stock diffusers only
    imgs = torch.load(out / "fresh.pt", weights_only=True)
    diff = {k: float((v - mine).abs().max()) for k, v in imgs.items()}
    print("\nmax |stock SDXL - gentrain| per load path:", diff)
    assert diff["lora"] <= 1e-5 and diff["kohya"] <= 1e-5, diff
    assert diff["base"] > 0.02 and diff["unet_only"] > 1e-2, diff   # the adapters matter, the CLIPs' ones too (0.06, 0.057)


def test_time_ids_come_from_the_sample_json_and_the_crop(tiny_sdxl, tmp_path):
    """A wide image whose json carries img2dataset's original_width/height, and a tall one without:
    add_time_ids = (original h, w, crop top, left, 16, 16), the crop in the resized image (centred)."""
    import numpy as np

    from gentrain.config import load_config
    from gentrain.data_pipeline.decode import size_crop
    from gentrain.data_pipeline.reader import make_shard_stream
    from gentrain.data_pipeline.writer import ShardSetWriter
    from gentrain.objectives import build_objective

    from data_helpers.shards import png

    root, pipe = tiny_sdxl
    w = ShardSetWriter(str(tmp_path / "shards"), max_samples=4, source="test")
    w.write({"__key__": "wide", "png": png(np.full((16, 24), 90, np.uint8)), "txt": "a 1",
             "json": json.dumps({"original_width": 1024, "original_height": 683})})
    w.write({"__key__": "tall", "png": png(np.full((32, 16), 90, np.uint8)), "txt": "a 2", "json": "{}"})
    w.close()
    cfg = load_config("finetune_t2i_lora", [f"model.pretrained={pipe}", f"data.shards={tmp_path / 'shards'}",
                                            *COMMON, "model.lora.rank=2", "model.cfg_dropout=0"])
    assert cfg.data.size_crop is True   # validation read the class from model_index.json (offline)
    cfg.data.size_crop = False           # as for a hub id not in the local cache: the loaded adapter sets it
    objective = build_objective(cfg)
    assert cfg.data.size_crop is True   # the SDXL adapter asked the reader for sizes and crops
    batch = next(iter(make_shard_stream(cfg.data, batch_size=2, rank=0, world_size=1, seed=0)))
    _, cond = objective.inputs(batch)
    got = {k: row.tolist() for k, row in zip(batch["key"], cond["time_ids"])}
    assert got == {"wide": [683, 1024, 0, 4, 16, 16], "tall": [32, 16, 8, 0, 16, 16]}, got
    assert sorted(cond) == ["emb", "pooled", "time_ids"] and cond["emb"].shape == (2, 16, 64)
    # a flipped sample's crop is mirrored: diffusers' script flips, then crops
    assert size_crop({}, (40, 16), (30, 16, 2, 0), 16, flip=True).tolist() == [16, 40, 0, 12]
    # without sizes in the batch (data.size_crop off): the training size, no crop, as the pipeline draws
    del batch["size_crop"]
    assert objective.inputs(batch)[1]["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2


def test_adapter_encodes_as_the_pipeline_does(tiny_sdxl):
    """The adapter's prompt encoding is the pipeline's encode_prompt, bit for bit (penultimate states of
    both CLIPs, the second's pooled output), and its uncond is encode_prompt's zeros."""
    from diffusers import StableDiffusionXLPipeline

    from gentrain.objectives.adapters.sdxl import SDXLAdapter

    _, pipe = tiny_sdxl
    p = StableDiffusionXLPipeline.from_pretrained(str(pipe))
    adapter = SDXLAdapter(p)
    with torch.no_grad():
        mine = adapter.encode(["a 3", "a seven"], lambda name, *a, **kw: adapter.parts[name](*a, **kw))
        emb, neg, pooled, neg_pooled = p.encode_prompt(["a 3", "a seven"], device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(mine["emb"], emb) and torch.equal(mine["pooled"], pooled)
    assert adapter.zero_uncond() and not neg.any() and not neg_pooled.any()


def test_previews_draw_at_the_sdxl_pipelines_own_guidance(tiny_sdxl):
    """Without model.guidance_scale, an SDXL fine-tune draws at StableDiffusionXLPipeline's own default (5.0,
    the adapter's default_guidance), not SD's 7.5; an SD folder keeps 7.5."""
    import inspect

    from diffusers import StableDiffusionXLPipeline

    from gentrain.objectives.pipeline_defaults import base_guidance

    _, pipe = tiny_sdxl
    default = inspect.signature(StableDiffusionXLPipeline.__call__).parameters["guidance_scale"].default
    assert base_guidance(str(pipe)) == default == 5.0
    sd = pipe.parent / "as_sd"
    sd.mkdir(exist_ok=True)
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert base_guidance(str(sd)) == 7.5


def test_a_class_no_adapter_serves_is_refused_in_one_line(tiny_sdxl, tmp_path):
    root, _ = tiny_sdxl
    flux = tmp_path / "auraflow"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "AuraFlowPipeline", "_diffusers_version": "0.32.0"}))
    r = run_cli("train", "finetune_t2i_lora", f"model.pretrained={flux}", f"data.shards={root / 'digits'}", *COMMON,
                f"run.output_dir={tmp_path / 'runs'}", "run.name=flux")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "is a AuraFlowPipeline; fine-tuning takes a StableDiffusionPipeline" in lines[0], lines
    assert "StableDiffusionXLPipeline" in lines[0] and "'model.pretrained'" in lines[0], lines
    assert not (tmp_path / "runs" / "flux").exists()


def test_full_finetune_trains_the_unet_on_text_and_time_ids_and_exports_a_pipeline(tiny_sdxl, tmp_path):
    """A full fine-tune (the UNet in fp32, both CLIPs frozen): one step's gradient reaches the UNet's
    added embedding (pooled text + add_time_ids) and its cross-attention; the export is an SDXL pipeline
    folder that from_pretrained loads with the trained UNet."""
    from diffusers import StableDiffusionXLPipeline

    from gentrain.config import load_config
    from gentrain.data_pipeline.reader import make_shard_stream
    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives import Runtime, build_objective

    root, pipe = tiny_sdxl
    cfg = load_config("finetune_t2i", [f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *COMMON])
    objective = build_objective(cfg)
    assert list(objective.nets) == ["unet"] and objective.partial_nets == ()
    unet = objective.nets["unet"].model
    assert all(p.requires_grad and p.dtype == torch.float32 for p in unet.parameters())
    objective.bind(Runtime(BatchRNG(generator=torch.Generator().manual_seed(0))))
    batch = next(iter(make_shard_stream(cfg.data, batch_size=4, rank=0, world_size=1, seed=0)))
    loss, _ = objective.loss("main", batch)
    loss.backward()
    for name in ("add_embedding.linear_1.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
        grad = dict(unet.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().max()) > 0, name
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(p.grad, alpha=-1e-2)
    info = objective.export(tmp_path / "export", cfg)
    assert info["kind"] == "full" and info["diffusers_class"] == "StableDiffusionXLPipeline", info
    loaded = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "export"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), unet.state_dict().values()))


def test_lora_under_bf16_keeps_the_base_in_bf16_and_every_adapter_gets_a_gradient(tiny_sdxl):
    """Under bf16 the frozen UNet and both CLIPs are held in bf16, their adapters train in fp32, and one
    autocast step gives every adapter (UNet, the first CLIP but its unread last layer, the second CLIP)
    a gradient through SDXL's prompt encoding and added embedding."""
    from gentrain.config import load_config
    from gentrain.data_pipeline.reader import make_shard_stream
    from gentrain.maths.rng import BatchRNG
    from gentrain.objectives import Runtime, build_objective

    root, pipe = tiny_sdxl
    over = [o for o in COMMON if "mixed_precision" not in o] + ["train.mixed_precision=bf16", "model.cfg_dropout=0.5"]
    cfg = load_config("finetune_t2i_lora", [f"model.pretrained={pipe}", f"data.shards={root / 'digits'}", *over,
                                            *LORA])
    objective = build_objective(cfg)
    assert objective.partial_nets == ("unet", "text_encoder", "text_encoder_2")
    for name in objective.partial_nets:
        params = list(objective.nets[name].named_parameters())
        assert {p.dtype for _, p in params if p.requires_grad} == {torch.float32}, name
        assert {p.dtype for _, p in params if not p.requires_grad} == {torch.bfloat16}, name
    objective.bind(Runtime(BatchRNG(generator=torch.Generator().manual_seed(0))))
    batch = next(iter(make_shard_stream(cfg.data, batch_size=4, rank=0, world_size=1, seed=0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = objective.loss("main", batch)
    loss.backward()
    for name in objective.partial_nets:
        missing = [k for k, p in objective.nets[name].named_parameters()   # lora_B: A gets none while B is 0
                   if p.requires_grad and (p.grad is None or not p.grad.any()) and "lora_B" in k]
        assert not missing, (name, missing[:3])
