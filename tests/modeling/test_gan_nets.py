"""GAN networks (gentrain.modeling.gan): shapes, init, conditioning, StyleGAN mapping tricks, save/load."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gentrain.modeling.gan.dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_init_, masked_mean
from gentrain.modeling.gan.mlp import MLPDiscriminator, MLPGenerator
from gentrain.modeling.gan.stylegan import StyleGenerator

from conftest import cli_env, ok, REPO

SMALL = dict(base=8)  # narrow nets: fast, same structure


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize_noise_strengths(g: StyleGenerator) -> None:
    with torch.no_grad():
        for layer in g.layers:
            layer.noise_strength.normal_(0.0, 0.5)


# ---------------------------------------------------------------- shapes and ranges

@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_generators_shape_and_range(size: int, channels: int) -> None:
    z = torch.randn(4, 16, generator=_seeded())
    for g in (DCGANGenerator(z_dim=16, image_size=size, channels=channels, **SMALL),
              StyleGenerator(z_dim=16, w_dim=16, image_size=size, channels=channels, **SMALL)):
        x = g(z)
        assert x.shape == (4, channels, size, size)
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0


def test_image_size_8_and_64_and_bad_sizes() -> None:
    for size in (8, 64):
        z = torch.randn(2, 8)
        assert DCGANGenerator(z_dim=8, image_size=size, base=4)(z).shape == (2, 1, size, size)
        assert StyleGenerator(z_dim=8, w_dim=8, image_size=size, base=4)(z).shape == (2, 1, size, size)
        assert DCGANDiscriminator(image_size=size, base=4)(torch.randn(2, 1, size, size)).shape == (2,)
    for bad in (4, 12, 24):
        with pytest.raises(ValueError, match="power of two"):
            DCGANGenerator(image_size=bad)
        with pytest.raises(ValueError, match="power of two"):
            StyleGenerator(image_size=bad)


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "none"])
def test_discriminator_logits_shape(size: int, norm: str) -> None:
    d = DCGANDiscriminator(image_size=size, channels=3, norm=norm, **SMALL)
    out = d(torch.rand(5, 3, size, size) * 2 - 1)
    assert out.shape == (5,) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="norm"):
        DCGANDiscriminator(norm="spectral")


def test_mlp_nets() -> None:
    g, d = MLPGenerator(), MLPDiscriminator(norm="layer")
    x = g(torch.randn(7, 2))
    assert x.shape == (7, 2)
    assert d(x).shape == (7,)
    assert MLPGenerator(z_dim=3, hidden=16, depth=2, out_dim=5)(torch.randn(2, 3)).shape == (2, 5)
    assert sum(isinstance(m, nn.Linear) for m in g.modules()) == 4  # depth 3 hidden + output
    assert sum(isinstance(m, nn.LayerNorm) for m in d.modules()) == 3
    assert not any(isinstance(m, nn.LayerNorm) for m in MLPDiscriminator().modules())
    with pytest.raises(ValueError, match="norm"):
        MLPDiscriminator(norm="batch")


# ---------------------------------------------------------------- DCGAN init and structure

def test_dcgan_init_statistics() -> None:
    torch.manual_seed(0)
    g, d = DCGANGenerator(), DCGANDiscriminator()
    convt = next(m for m in g.modules() if isinstance(m, nn.ConvTranspose2d))
    conv = next(m for m in d.modules() if isinstance(m, nn.Conv2d))
    for w in (convt.weight, conv.weight, g.project[0].weight):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert abs(bn.weight.mean().item() - 1) < 0.01 and bn.bias.abs().max() == 0
    # applied by hand: overwrites a default-initialised module
    lin = dcgan_init_(nn.Sequential(nn.Linear(512, 512)))[0]
    assert abs(lin.weight.std().item() - 0.02) < 0.001 and lin.bias.abs().max() == 0


def _call_order(module: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Leaf modules in the order the forward pass calls them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m))
             for m in module.modules() if not list(m.children())]
    module(x)
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("size", [16, 32])
def test_no_norm_on_generator_output_or_discriminator_input(size: int) -> None:
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)
    g = DCGANGenerator(image_size=size, **SMALL)
    order = _call_order(g, torch.randn(2, 64))
    assert order[-1] is g.to_image and isinstance(g.to_image, nn.Conv2d)  # only tanh after the output conv
    assert isinstance(order[-2], nn.ReLU) and isinstance(order[-3], nn.BatchNorm2d)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in order) == {16: 2, 32: 3}[size]
    for norm in ("batch", "layer", "instance"):
        d = DCGANDiscriminator(image_size=size, norm=norm, **SMALL)
        seq = _call_order(d, torch.randn(2, 1, size, size))
        assert isinstance(seq[0], nn.Conv2d) and isinstance(seq[1], nn.LeakyReLU)  # input layer: no norm
        convs = [i for i, m in enumerate(seq) if isinstance(m, nn.Conv2d)]
        assert len(convs) == {16: 2, 32: 3}[size] + 1  # + the 4x4 feature conv
        for i in convs[1:-1]:
            assert isinstance(seq[i + 1], norms)
        assert sum(isinstance(m, norms) for m in seq) == len(convs) - 2


# ---------------------------------------------------------------- conditioning

def test_conditional_generator_labels() -> None:
    g = DCGANGenerator(z_dim=16, num_classes=10, **SMALL).eval()
    z = torch.randn(3, 16, generator=_seeded())
    a = g(z, torch.tensor([1, 2, 3]))
    assert torch.equal(a, g(z, torch.tensor([1, 2, 3])))
    b = g(z, torch.tensor([4, 2, 3]))
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1:], b[1:])
    with pytest.raises(ValueError, match="labels"):
        g(z)
    with pytest.raises(ValueError, match="labels"):
        DCGANGenerator(z_dim=16, **SMALL)(z, torch.tensor([1, 2, 3]))


def test_conditional_generator_text() -> None:
    g = DCGANGenerator(z_dim=16, text_dim=12, **SMALL).eval()
    z = torch.randn(2, 16)
    text, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    a = g(z, text=text, text_mask=mask)
    text2 = text.clone()
    text2[0, 4] += 100.0  # a padded token
    assert torch.equal(a, g(z, text=text2, text_mask=mask))
    text2[0, 0] += 1.0  # a real token
    assert not torch.equal(a[0], g(z, text=text2, text_mask=mask)[0])  # (padding above: bitwise equal)
    with pytest.raises(ValueError, match="text"):
        g(z)


def test_masked_mean_ignores_padding() -> None:
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = masked_mean(states, mask)
    assert torch.allclose(out[0], states[0, :2].mean(0)) and torch.allclose(out[1], states[1].mean(0))
    changed = states.clone()
    changed[0, 2:] = float("nan")  # even NaN in a padded slot stays out
    assert torch.equal(masked_mean(changed, mask), out)
    assert torch.equal(masked_mean(states, mask.bool()), out)
    assert torch.equal(masked_mean(states, torch.zeros(2, 4)), torch.zeros(2, 3))  # no valid token
    assert torch.allclose(masked_mean(states, None), states.mean(1))
    from gentrain.modeling.gan.dcgan import AttentionPool

    pool = AttentionPool(3)  # starts as the masked mean, then weighs tokens by the learned query
    assert torch.allclose(pool(states, mask), out, atol=1e-6)
    assert torch.equal(pool(changed, mask), pool(states, mask))
    assert torch.equal(pool(states, torch.zeros(2, 4)), torch.zeros(2, 3))


def test_projection_discriminator_labels() -> None:
    d = DCGANDiscriminator(num_classes=10, norm="layer", **SMALL).eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    y1, y2 = torch.tensor([0, 5, 9]), torch.tensor([3, 5, 1])
    diff = d(x, y1) - d(x, y2)
    h = d.features(d.blocks(x))
    assert h.shape == (3, d.feature_dim)
    by_hand = ((d.label_embed.weight[y1] - d.label_embed.weight[y2]) * h).sum(1)
    assert torch.allclose(diff, by_hand, atol=1e-6)
    assert diff[1] == 0 and diff[0] != 0
    assert torch.allclose(d(x, y1), d.linear(h).squeeze(1) + (d.label_embed(y1) * h).sum(1), atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        d(x)


def test_projection_discriminator_text() -> None:
    d = DCGANDiscriminator(text_dim=12, norm="batch", **SMALL).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    t1, t2 = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    h = d.features(d.blocks(x))
    by_hand = ((d.text_proj(d.text_pool(t1, mask)) - d.text_proj(d.text_pool(t2, mask))) * h).sum(1)
    assert torch.allclose(d(x, text=t1, text_mask=mask) - d(x, text=t2, text_mask=mask), by_hand, atol=1e-6)
    t3 = t1.clone()
    t3[0, 5] = 1e4  # padded
    assert torch.equal(d(x, text=t1, text_mask=mask), d(x, text=t3, text_mask=mask))


def test_layer_norm_discriminator_is_per_sample_batch_norm_is_not() -> None:
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    x2 = x.clone()
    x2[1] = torch.rand(1, 16, 16) * 2 - 1
    for norm, independent in (("layer", True), ("instance", True), ("none", True), ("batch", False)):
        torch.manual_seed(0)
        d = DCGANDiscriminator(norm=norm, **SMALL).train()
        a, b = d(x), d(x2)
        assert torch.allclose(a[[0, 2, 3]], b[[0, 2, 3]], atol=1e-6) == independent, norm
        assert not torch.allclose(a[1], b[1])
    d = MLPDiscriminator(norm="layer").train()
    p = torch.randn(4, 2)
    p2 = p.clone()
    p2[1] += 3
    assert torch.equal(d(p)[0], d(p2)[0])


# ---------------------------------------------------------------- StyleGAN

def _style(**kw) -> StyleGenerator:
    torch.manual_seed(0)
    return StyleGenerator(z_dim=16, w_dim=16, mapping_layers=2, **{**SMALL, **kw})


def test_stylegan_structure() -> None:
    g = _style()
    assert g.num_ws == 5 and _style(image_size=32).num_ws == 7
    assert g.const.shape == (1, 32, 4, 4)
    assert g.w_avg.shape == (16,) and "w_avg" in dict(g.named_buffers())
    noise = g.make_noise(3)
    assert [n.shape[-1] for n in noise] == [4, 8, 8, 16, 16] and all(n.shape[:2] == (3, 1) for n in noise)
    for layer in g.layers:  # AdaIN scale bias starts at 1, offset at 0
        ch = layer.conv.out_channels
        assert torch.equal(layer.style.bias[:ch], torch.ones(ch))
        assert torch.equal(layer.style.bias[ch:], torch.zeros(ch))
    assert g.mapping(torch.randn(4, 16)).shape == (4, 16)
    with pytest.raises(ValueError, match="ws"):
        g.synthesis(torch.randn(2, 4, 16))


def test_stylegan_noise_from_generator_and_given() -> None:
    g = _style().eval()
    _randomize_noise_strengths(g)
    z = torch.randn(2, 16)
    a = g(z, generator=_seeded(1))
    assert torch.equal(a, g(z, generator=_seeded(1)))
    assert not torch.allclose(a, g(z, generator=_seeded(2)))  # the noise matters once its scale is nonzero
    assert torch.equal(a, g(z, noise=g.make_noise(2, _seeded(1))))


def test_stylegan_truncation_zero_is_w_avg() -> None:
    g = _style().train()
    for _ in range(3):
        g.mapping(torch.randn(8, 16))  # a nonzero w_avg
    g.eval()
    _randomize_noise_strengths(g)
    assert g.w_avg.abs().sum() > 0
    z = torch.randn(4, 16)
    noise = [n[:1].expand(4, -1, -1, -1) for n in g.make_noise(1, _seeded(3))]  # same noise for every sample
    captured: list[torch.Tensor] = []
    orig = g.synthesis
    g.synthesis = lambda ws, noise=None, generator=None: (captured.append(ws), orig(ws, noise, generator))[1]
    x = g(z, truncation=0.0, noise=noise)
    assert torch.equal(captured[0], g.w_avg.expand(4, g.num_ws, -1))
    assert torch.allclose(x, x[:1].expand_as(x), atol=1e-6)
    x_half = g(z, truncation=0.5, noise=noise)
    w = g.mapping(z)
    assert torch.allclose(captured[1], (g.w_avg + 0.5 * (w - g.w_avg))[:, None].expand(-1, g.num_ws, -1), atol=1e-6)
    assert not torch.allclose(x_half, x_half[:1].expand_as(x_half))


def test_stylegan_style_mixing() -> None:
    g = _style().eval()
    _randomize_noise_strengths(g)
    z, z2 = torch.randn(3, 16), torch.randn(3, 16)
    noise = g.make_noise(3, _seeded(4))
    plain, other = g(z, noise=noise), g(z2, noise=noise)
    assert torch.equal(g(z, mix_z=z2, mix_layer=g.num_ws, noise=noise), plain)
    assert torch.equal(g(z, mix_z=z2, mix_layer=0, noise=noise), other)
    mixed = g(z, mix_z=z2, mix_layer=2, noise=noise)
    w, w2 = g.mapping(z), g.mapping(z2)
    ws = torch.stack([w, w, w2, w2, w2], dim=1)
    assert torch.equal(mixed, g.synthesis(ws, noise))
    # per-sample crossover: sample 0 none, sample 1 all layers, sample 2 from layer 2
    per = g(z, mix_z=z2, mix_layer=torch.tensor([g.num_ws, 0, 2]), noise=noise)
    assert torch.equal(per[0], plain[0]) and torch.equal(per[1], other[1]) and torch.equal(per[2], mixed[2])
    with pytest.raises(ValueError, match="mix"):
        g(z, mix_z=z2)


def test_stylegan_w_avg_ema_train_only() -> None:
    g = _style()
    z = torch.randn(8, 16)
    g.eval()
    g(z)
    g.mapping(z)
    assert torch.equal(g.w_avg, torch.zeros(16))
    g.train()
    w = g.mapping(z).detach()
    assert torch.allclose(g.w_avg, 0.005 * w.mean(0), atol=1e-7)
    before = g.w_avg.clone()
    g(z, mix_z=torch.randn(8, 16), mix_layer=2)  # only the main z moves it
    assert torch.allclose(g.w_avg, 0.995 * before + 0.005 * w.mean(0), atol=1e-7)
    g.eval()
    after = g.w_avg.clone()
    g(torch.randn(8, 16), truncation=0.7)
    assert torch.equal(g.w_avg, after)


def test_stylegan_conditional() -> None:
    g = _style(num_classes=4).eval()
    z = torch.randn(2, 16)
    noise = g.make_noise(2, _seeded(5))
    a = g(z, torch.tensor([0, 1]), noise=noise)
    assert torch.equal(a, g(z, torch.tensor([0, 1]), noise=noise))
    b = g(z, torch.tensor([2, 1]), noise=noise)
    assert not torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="labels"):
        g(z)


# ---------------------------------------------------------------- save_pretrained -> from_pretrained, fresh process

_RELOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from gentrain.modeling.gan.dcgan import DCGANGenerator
from gentrain.modeling.gan.mlp import MLPGenerator
from gentrain.modeling.gan.stylegan import StyleGenerator
root = sys.argv[1]
inp = torch.load(root + "/inputs.pt")
with torch.no_grad():
    out = {
        "dcgan": DCGANGenerator.from_pretrained(root + "/dcgan").eval()(inp["z"], inp["labels"]),
        "style": StyleGenerator.from_pretrained(root + "/style").eval()(
            inp["z"], truncation=0.7, mix_z=inp["z2"], mix_layer=inp["mix"], noise=inp["noise"]),
        "mlp": MLPGenerator.from_pretrained(root + "/mlp").eval()(inp["p"]),
    }
torch.save(out, root + "/outputs.pt")
"""


def test_save_pretrained_round_trip_fresh_process(tmp_path) -> None:
    torch.manual_seed(0)
    dcgan = DCGANGenerator(z_dim=16, num_classes=10, **SMALL)
    dcgan.train()(torch.randn(8, 16), torch.randint(0, 10, (8,)))  # non-trivial BatchNorm running stats
    style = StyleGenerator(z_dim=16, w_dim=16, image_size=32, **SMALL)
    style.train().mapping(torch.randn(8, 16))  # a non-zero w_avg (a buffer: must be saved too)
    _randomize_noise_strengths(style)
    mlp = MLPGenerator(hidden=32)
    inputs = {"z": torch.randn(3, 16), "z2": torch.randn(3, 16), "labels": torch.tensor([1, 7, 3]),
              "mix": torch.tensor([1, 3, 7]), "noise": style.make_noise(3, _seeded(6)), "p": torch.randn(5, 2)}
    with torch.no_grad():
        want = {"dcgan": dcgan.eval()(inputs["z"], inputs["labels"]),
                "style": style.eval()(inputs["z"], truncation=0.7, mix_z=inputs["z2"], mix_layer=inputs["mix"],
                                      noise=inputs["noise"]),
                "mlp": mlp.eval()(inputs["p"])}
    for name, model in (("dcgan", dcgan), ("style", style), ("mlp", mlp)):
        model.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "config.json").is_file()
        assert list((tmp_path / name).glob("*.safetensors"))
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO)
    ok(proc)
    got = torch.load(tmp_path / "outputs.pt")
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_equal_linear_starts_he_initialised_and_takes_scaled_steps() -> None:
    from gentrain.modeling.gan.stylegan import EqualLinear

    torch.manual_seed(0)
    lin = EqualLinear(256, 128, lr_mul=0.01, gain=2 ** 0.5)
    used = lin.weight * lin.scale
    assert abs(used.std().item() - (2 / 256) ** 0.5) < 0.005          # He init of the weight in use
    assert abs(lin.weight.std().item() - 100) < 5                     # stored at 1 / lr_mul
    x = torch.randn(8, 256)
    y = lin(x)
    torch.testing.assert_close(y, F.linear(x, used))
    y.square().sum().backward()
    dense = (2 * y).T @ x                                             # d loss / d (weight in use)
    torch.testing.assert_close(lin.weight.grad, dense * lin.scale)    # the stored weight's gradient: scaled down
