"""Pix2Pix U-Net and CycleGAN ResNet generators: shapes, skips, dropout, norms, save/load."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import REPO, cli_env
from gentrain.modeling.discriminators import PatchGAN
from gentrain.modeling.gan.image2image import ResnetGenerator, UNetGenerator


def _x(size: int, b: int = 2, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [16, 32])
def test_shapes_and_tanh_range(size):
    torch.manual_seed(0)
    for net in (UNetGenerator(in_channels=1, out_channels=3, base=8, image_size=size),
                ResnetGenerator(in_channels=1, out_channels=3, base=8, n_blocks=2)):
        y = net(_x(size) * 50)  # large inputs: still bounded by tanh
        assert y.shape == (2, 3, size, size)
        assert y.abs().max() <= 1 and y.std() > 0.05
    # Pix2Pix's discriminator scores (input, output) pairs: PatchGAN on the channel concatenation
    d = PatchGAN(in_channels=1 + 3, base=8, layers=2, norm="batch")
    assert d(torch.cat([_x(size), y], 1)).shape == (2, 1, size // 4 - 2, size // 4 - 2)
    with pytest.raises(ValueError, match="power of 2"):
        UNetGenerator(image_size=24)


def test_unet_layout_and_skip_connections():
    torch.manual_seed(0)
    net = UNetGenerator(base=8, image_size=16, dropout=0.0).eval()
    assert len(net.down) == len(net.up) == 4  # 16 -> 8 -> 4 -> 2 -> 1 and back
    assert not any(isinstance(m, nn.BatchNorm2d) for m in (net.down[0], *net.down[-1]))  # first, innermost
    assert [m.in_channels for m in (s[1] for s in net.up[:3])] == [16, 32, 64]  # doubled by the skips
    # cut the bottleneck: with no information through the 1x1 code, the output still follows the
    # input's detail, through the skips only
    inner = net.down[-1][1]
    with torch.no_grad():
        inner.weight.zero_()
        inner.bias.zero_()
        a, b = _x(16, seed=1), _x(16, seed=1).clone()
        b[:, :, 3, 3] += 3.0  # one pixel
        ya, yb = net(a), net(b)
    diff = (ya - yb).abs()[0, 0]
    assert diff[2:5, 2:5].max() > 1e-3 and diff[12:, 12:].max() < diff[2:5, 2:5].max()


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    net = UNetGenerator(base=8, image_size=32)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(m.p == 0.5 for m in drops)
    assert [i for i, u in enumerate(net.up) if any(isinstance(m, nn.Dropout) for m in u)] == [2, 3, 4]  # innermost 3
    assert not any(isinstance(m, nn.Dropout) for m in UNetGenerator(base=8, image_size=32, dropout=0).modules())
    assert len([m for m in UNetGenerator(base=8, image_size=4).modules() if isinstance(m, nn.Dropout)]) == 1
    x = _x(32, b=4)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_resnet_generator_norms_and_blocks():
    net = ResnetGenerator(base=8, n_blocks=3, n_down=2)
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in net.modules()) == 1 + 2 + 3 * 2 + 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(not m.affine and not m.track_running_stats for m in net.modules() if isinstance(m, nn.InstanceNorm2d))
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in net.modules()) == 2 + 3 * 2
    strided = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.stride == (2, 2)]
    assert len(strided) == 4
    batch = ResnetGenerator(base=8, n_blocks=1, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in batch.modules())
    with pytest.raises(ValueError, match="instance or batch"):
        ResnetGenerator(norm="group")
    # n_down=3 halves three times: 16 -> 2 inside, back to 16
    assert ResnetGenerator(base=4, n_blocks=1, n_down=3)(_x(16)).shape == (2, 1, 16, 16)


CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from gentrain.modeling.gan.image2image import ResnetGenerator, UNetGenerator
    root = sys.argv[1]
    data = torch.load(root + "/io.pt")
    for name, cls in (("unet", UNetGenerator), ("resnet", ResnetGenerator)):
        net = cls.from_pretrained(root + "/" + name).eval()
        with torch.no_grad():
            assert torch.equal(net(data[name + "_x"]), data[name + "_y"]), name
        assert {k: v for k, v in net.config.items() if not k.startswith("_")} == data[name + "_config"], name
    print("reproduced")
""")


def test_save_pretrained_round_trip_in_a_fresh_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs on 1 thread too: the same kernels, bit for bit
    try:
        torch.manual_seed(0)
        unet = UNetGenerator(in_channels=2, out_channels=1, base=8, image_size=16, dropout=0.3)
        resnet = ResnetGenerator(in_channels=1, out_channels=2, base=8, n_blocks=2, norm="batch")
        data = {}
        for name, net, c in (("unet", unet, 2), ("resnet", resnet, 1)):
            net.train()
            with torch.no_grad():
                net(_x(16, b=4, c=c, seed=5))  # BatchNorm running statistics away from their defaults
            net.eval()
            net.save_pretrained(str(tmp_path / name))
            x = _x(16, b=3, c=c, seed=7)
            with torch.no_grad():
                data[f"{name}_x"], data[f"{name}_y"] = x, net(x)
            data[f"{name}_config"] = {k: v for k, v in net.config.items() if not k.startswith("_")}
        torch.save(data, tmp_path / "io.pt")
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "unet" / "config.json").exists()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=cli_env(), cwd=REPO)
    assert r.returncode == 0 and "reproduced" in r.stdout, r.stderr[-3000:]
