"""Autoencoder maths: analytic KL vs Monte Carlo, straight-through gradients, codebook term,
the adversarial phases' isolation."""
import math

import torch

from gentrain.modeling.autoencoders import VQAutoencoder
from gentrain.maths.gan_losses import d_loss
from gentrain.maths.bottleneck import code_statistics, kl_to_standard_normal


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 3, generator=g)
    logvar = torch.randn(4, 3, generator=g) * 0.5
    std = torch.exp(0.5 * logvar)
    z = mean + std * torch.randn(200_000, 4, 3, generator=g)                 # samples of q
    log_q = (-0.5 * ((z - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_p = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
    mc = (log_q - log_p).mean(0)                                           # E_q[log q - log p]
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), mc, rtol=0.02, atol=0.01)
    assert torch.allclose(kl_to_standard_normal(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))


def tiny_vq(**kw):
    torch.manual_seed(0)
    return VQAutoencoder(in_channels=1, block_out_channels=[8, 8], latent_channels=4, num_codes=16,
                         norm_num_groups=4, sample_size=8, dead_code_restart=False, **kw)


def test_straight_through_passes_decoder_gradient_to_encoder_unchanged():
    ae = tiny_vq()
    x = torch.randn(2, 1, 8, 8)
    z_e = ae.encode(x).detach().requires_grad_(True)
    z_q, _ = ae.quantize(z_e)
    z_st = z_e + (z_q - z_e).detach()
    out = ae.decode(z_st)
    out.pow(2).sum().backward()
    grad_e = z_e.grad.clone()
    # the decoder's gradient at its own input, taken directly: identical, bit for bit
    z_in = z_st.detach().requires_grad_(True)
    ae.decode(z_in).pow(2).sum().backward()
    assert torch.equal(grad_e, z_in.grad)
    assert torch.allclose(z_st, z_q)                                        # forward value is quantised


def test_codebook_term_moves_only_the_codebook_and_commitment_only_the_encoder():
    ae = tiny_vq()
    x = torch.randn(2, 1, 8, 8)
    _, z_e, z_q, _ = ae(x)
    codebook_term = torch.nn.functional.mse_loss(z_q, z_e.detach())
    codebook_term.backward()
    enc_grads = [p.grad for n, p in ae.named_parameters() if "encoder" in n or "quant_conv" in n]
    assert all(g is None or g.abs().max() == 0 for g in enc_grads)
    assert ae.codebook.grad is not None and ae.codebook.grad.abs().max() > 0
    ae.zero_grad(set_to_none=True)
    _, z_e, z_q, _ = ae(x)
    commitment = torch.nn.functional.mse_loss(z_e, z_q.detach())
    commitment.backward()
    assert ae.codebook.grad is None or ae.codebook.grad.abs().max() == 0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in ae.named_parameters() if "encoder" in n)


def test_ema_codebook_is_not_trained_by_gradients_and_tracks_encoder_outputs():
    ae = tiny_vq(ema_codebook=True, ema_decay=0.5)
    assert not ae.codebook.requires_grad
    before = ae.codebook.detach().clone()
    ae.train()
    ae(torch.randn(4, 1, 8, 8))
    assert not torch.equal(before, ae.codebook)


def test_dead_code_restart_reseeds_unused_codes_from_encoder_outputs():
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def used_fraction(restart):
        torch.manual_seed(0)
        ae = VQAutoencoder(in_channels=1, block_out_channels=[8, 8], latent_channels=4, num_codes=32,
                           norm_num_groups=4, sample_size=8, dead_code_restart=restart, ema_decay=0.5)
        ae.train()
        for _ in range(30):
            ae(x)
        _, idx = ae.quantize(ae.encode(x))
        dead = ae.usage < ae.restart_threshold / ae.num_codes
        return (torch.bincount(idx.flatten(), minlength=32) > 0).float().mean().item(), dead

    without, _ = used_fraction(False)
    with_restart, dead = used_fraction(True)
    assert without < 0.2                  # a small uniform init leaves most codes unused
    assert with_restart > 0.6 and with_restart > 3 * without
    assert not dead.any()                 # no code stays below the threshold


def test_code_statistics():
    usage, ppl = code_statistics(torch.tensor([0, 1, 2, 3]), 8)
    assert usage == 0.5 and abs(ppl - 4) < 1e-5
    usage, ppl = code_statistics(torch.tensor([5, 5, 5]), 8)
    assert usage == 1 / 8 and abs(ppl - 1) < 1e-5


def test_hinge_loss():
    assert d_loss("hinge", torch.full((3,), 2.0), torch.full((3,), -2.0)) == 0
    assert d_loss("hinge", torch.zeros(3), torch.zeros(3)) == 2
