"""What a family declares (objectives/base.py) is what the loop, the CLI and eval read: every
evaluator name it declares is one eval's registry has, the Trainer hands it its runtime through
`bind` instead of writing into it, and latent and GAN families share one conditioning module."""
import pytest
import torch
from torch import nn

from gentrain.config import load_config
from gentrain.errors import GentrainError
from gentrain.eval.metrics import EVALUATORS, evaluate
from gentrain.objectives import Objective, Runtime, build_objective
from gentrain.objectives.conditioning import ClassConditioning, NoConditioning, gan_conditioning, make_conditioning

PIXELS = ["model.latent.autoencoder=null"]
FAMILIES = {  # preset -> (overrides, what it declares it is scored on)
    "flow_toy2d": ([], ("toy2d",)),
    "ddpm_toy2d": ([], ("toy2d",)),
    "gan_toy2d": ([], ("toy2d", "toy2d_modes")),
    "vae_toy2d": ([], ("toy2d", "reconstruction_kl")),
    "vae_digits": ([], ("reconstruction_kl",)),
    "vqvae_digits": ([], ("reconstruction_vq",)),
    "dcgan_digits": ([], ("digits",)),
    "cgan_digits": ([], ("digits",)),
    "pix2pix_edges2digits": ([], ("translation",)),
    "cyclegan_digits_inverted": ([], ("cycle",)),
    "dit_class_digits": (PIXELS, ("digits",)),
}


@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_each_family_declares_evaluators_eval_has(preset):
    extra, declared = FAMILIES[preset]
    obj = build_objective(load_config(preset, extra))
    assert obj.evaluates == declared
    assert set(obj.evaluates) <= set(EVALUATORS)
    assert obj.conditioning.kind in ("none", "class", "text", "image")


def test_an_undeclared_evaluator_is_refused_by_name():
    class Odd(Objective):
        evaluates = ("toy2d", "no_such_scorer")

    cfg = load_config("flow_toy2d", [])
    with pytest.raises(ValueError, match="no_such_scorer"):
        evaluate(Odd(), cfg)


def test_the_trainer_binds_a_runtime_instead_of_writing_into_the_family(tmp_path, fresh_accelerate_state):
    from gentrain.train.loop import Trainer

    cfg = load_config("flow_toy2d", ["train.progress_bar=false", "train.sample_every=0", "train.checkpoint_every=0",
                                     "train.max_steps=4", "eval.num_samples=50", "train.batch_size=16",
                                     f"run.output_dir={tmp_path}", "run.trackers=[]"])
    trainer = Trainer(cfg, tmp_path / "run")
    obj = trainer.objective
    assert not {"rng", "step", "plain_nets", "weight_tensors"} & set(vars(obj))   # nothing patched in
    assert obj.runtime is trainer.runtime and obj.plain_nets is trainer.raw_nets
    trainer.train(stop_at=2)   # no final preview or eval: the test is about the hand-over
    assert obj.step == trainer.runtime.step == 1   # the last step run


def test_an_unbound_family_reads_a_default_runtime():
    class Lin(Objective):
        def __init__(self):
            self.nets = {"net": nn.Linear(2, 2)}

    a, b = Lin(), Lin()
    assert a.rng.world_size == 1 and a.step == 0 and a.plain_nets == {}
    assert a.weight_tensors("net") == list(a.nets["net"].parameters())
    a.step = 5   # a tool driving a family outside the Trainer (the memory plan)
    assert (a.step, b.step) == (5, 0)
    a.bind(Runtime(step=7, weight_tensors=lambda name: []))
    assert a.step == 7 and a.weight_tensors("net") == []


def test_latent_and_gan_families_share_one_conditioning():
    latent = load_config("dit_class_digits", PIXELS).model.latent
    gan = load_config("cgan_digits", []).model
    dit, cgan = make_conditioning(latent), gan_conditioning(gan)
    assert type(dit) is type(cgan) is ClassConditioning
    assert isinstance(gan_conditioning(load_config("dcgan_digits", []).model), NoConditioning)
    cond, uncond = dit.request({"labels": [1, 2]}, 2)
    assert cond["labels"].tolist() == [1, 2] and uncond["labels"].tolist() == [1000, 1000]   # DiT's null class
    assert cgan.request({"labels": [1, 2]}, 2)[1] is None                                      # nothing guides a GAN
    batch = {"label": torch.tensor([3, 11]), "key": ["s0", "s1"]}
    with pytest.raises(GentrainError, match=r"sample s0\): class label 11 is outside \[0, 10\) \(model.num_classes\)"):
        cgan.train(batch)
    with pytest.raises(GentrainError, match=r"needs a `label`"):
        cgan.train({"key": ["s0"]})
