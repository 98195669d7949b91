"""FLOP counting for the step-speed bench (issue 13): known layers match the hand formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gentrain.train.flops import matmul_peak, model_flops

pytestmark = pytest.mark.speed


def test_linear_and_conv_training_flops_match_hand_formulas():
    B, i, o = 8, 32, 16
    lin, x = nn.Linear(i, o), torch.randn(B, i, requires_grad=True)
    # forward 2*B*i*o; backward: grad input and grad weight, 2*B*i*o each
    assert model_flops(lambda: lin(x).sum().backward())["total"] == 3 * 2 * B * i * o
    conv, img = nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 10, 10, requires_grad=True)
    fwd = 2 * 2 * 8 * 10 * 10 * 3 * 3 * 3       # 2 * B * Cout * H * W * Cin * k * k
    assert model_flops(lambda: conv(img).sum().backward())["total"] == 3 * fwd


def test_attention_flops_are_added_where_the_counter_gives_none():
    B, H, L, D = 2, 4, 16, 8
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    f = model_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    hand = 3 * 4 * B * H * L * L * D
    if f["counted"] == 0:           # CPU: the counter has no formula for the fused kernel
        assert f["attention_added"] == hand and f["total"] == hand
    else:
        assert f["attention_added"] == 0 and f["total"] == pytest.approx(hand, rel=0.01)


def test_matmul_peak_is_a_positive_rate():
    assert matmul_peak(n=256, seconds=0.05) > 1e6
    # a warm-up longer than the time box (bf16 on a slow CPU) still gets one timed repeat, never 0
    assert matmul_peak(torch.bfloat16, n=64, seconds=0.0) > 0
