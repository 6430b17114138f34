"""The optimizers of reference/optimizers.md §9 and the options every matrix optimizer has, against
direct float64 transcriptions with the exact polar factor (tolerance 1e-10): NorMuon, AdaMuon, Dion,
cautious weight decay, per-head orthogonalization; and the update tail's scale rule."""

import math

import pytest
import torch

from optim import AdaMuon, Dion, Muon, NorMuon
from optim.orthogonalize import polar_svd
from optim.stages import ScaleByShape, ScaleToRms
from test_optimizers import BETA, LR, SVD, WD, apply, check, run_optimizer, scale_of, trajectory

BETA2, EPS = 0.9, 1e-8


def transcribe_normuon():
    W0, grads, _ = trajectory()
    Ws, Ms, vs = list(W0), [torch.zeros_like(w) for w in W0], [torch.zeros(w.shape[0], 1, dtype=w.dtype) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ms[i] = BETA * Ms[i] + (1 - BETA) * G
            O = polar_svd((1 - BETA) * G + BETA * Ms[i])
            vs[i] = BETA2 * vs[i] + (1 - BETA2) * (O**2).mean(dim=1, keepdim=True)
            O_hat = O / (vs[i].sqrt() + EPS)
            Ws[i] = apply(Ws[i], O_hat * O.norm() / O_hat.norm(), "match_rms_adamw")
    return Ws, {"momentum/buffer": Ms, "neuron_moment/v": vs}


def transcribe_adamuon():
    W0, grads, _ = trajectory()
    Ws, Ms, Vs = list(W0), [torch.zeros_like(w) for w in W0], [torch.zeros_like(w) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ms[i] = BETA * Ms[i] + (1 - BETA) * G
            O = polar_svd(torch.sign((1 - BETA) * G + BETA * Ms[i]))
            Vs[i] = BETA2 * Vs[i] + (1 - BETA2) * O**2
            O_hat = O / (Vs[i].sqrt() + EPS)
            m, n = O.shape
            Ws[i] = Ws[i] * (1 - LR * WD) - LR * 0.2 * math.sqrt(m * n) * O_hat / (O_hat.norm() + EPS)
    return Ws, {"momentum/buffer": Ms, "update_moment/v": Vs}


def transcribe_dion(rank_fraction, rule):
    W0, grads, _ = trajectory()
    Ws, Ms = list(W0), [torch.zeros_like(w) for w in W0]
    Qs = [torch.randn(w.shape[1], math.ceil(rank_fraction * min(w.shape)), dtype=w.dtype,
                      generator=torch.Generator().manual_seed(i)) for i, w in enumerate(W0)]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ms[i] = Ms[i] + G
            P, _ = torch.linalg.qr(Ms[i] @ Qs[i])
            R = Ms[i].T @ P
            Ms[i] = Ms[i] - (1 - BETA) * P @ R.T
            Qs[i] = R / (R.norm(dim=0, keepdim=True) + EPS)
            Ws[i] = apply(Ws[i], P @ Qs[i].T, rule)
    return Ws, {"dion/momentum": Ms, "dion/q": Qs}


def transcribe_cautious_muon():
    W0, grads, _ = trajectory()
    Ws, Ms = list(W0), [torch.zeros_like(w) for w in W0]
    for G_t in grads:
        for i, G in enumerate(G_t):
            Ms[i] = BETA * Ms[i] + (1 - BETA) * G
            D = scale_of(Ws[i].shape, "match_rms_adamw") * polar_svd((1 - BETA) * G + BETA * Ms[i])
            Ws[i] = Ws[i] - LR * (D + WD * Ws[i] * (D * Ws[i] > 0))
    return Ws, {"momentum/buffer": Ms}


def test_normuon_equations():
    check(*run_optimizer(lambda ps: NorMuon(ps, momentum=BETA, beta2=BETA2, eps=EPS, **SVD)), *transcribe_normuon())


def test_adamuon_equations():
    check(*run_optimizer(lambda ps: AdaMuon(ps, momentum=BETA, beta2=BETA2, eps=EPS, **SVD)), *transcribe_adamuon())


@pytest.mark.parametrize("rank_fraction", [1.0, 0.5])
@pytest.mark.parametrize("rule", ["match_rms_adamw", "spectral"])
def test_dion_equations(rank_fraction, rule):
    make = lambda ps: Dion(ps, lr=LR, weight_decay=WD, momentum=BETA, eps=EPS, rank_fraction=rank_fraction, adjust_lr_fn=rule)  # noqa: E731
    params, opt = run_optimizer(make)
    check(params, opt, *transcribe_dion(rank_fraction, rule))
    assert [tuple(opt.state[p]["dion/q"].shape) for p in params] == [(12, math.ceil(rank_fraction * 12)), (24, math.ceil(rank_fraction * 12)),
                                                                    (16, math.ceil(rank_fraction * 16))]


def test_cautious_weight_decay_equations():
    check(*run_optimizer(lambda ps: Muon(ps, momentum=BETA, cautious_weight_decay=True, **SVD)), *transcribe_cautious_muon())


def test_cautious_weight_decay_skips_coordinates_the_update_moves_away_from_zero():
    W = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64))
    opt = Muon([W], lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False, cautious_weight_decay=True, adjust_lr_fn="original", orthogonalizer={"method": "svd"})
    W.grad = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64) + torch.diag(torch.tensor([1e-3, 2e-3], dtype=torch.float64))
    before = W.detach().clone()
    D = polar_svd(W.grad)
    opt.step()
    decayed = (D * before > 0)
    assert decayed.any() and (~decayed).any()
    assert torch.allclose(W.detach(), before - 0.1 * (D + 0.5 * before * decayed), atol=1e-14)


@pytest.mark.parametrize("split,blocks_of", [((2, 0), lambda X: X.chunk(2, dim=0)), ((3, 1), lambda X: X.chunk(3, dim=1))])
def test_split_heads_orthogonalizes_each_block_with_its_own_scale(split, blocks_of):
    """One (24, 12) and one (12, 24) matrix per head split; each block gets its polar factor and s(block shape)."""
    g = torch.Generator().manual_seed(3)
    W0 = [torch.randn(24, 12, generator=g, dtype=torch.float64), torch.randn(12, 24, generator=g, dtype=torch.float64)]
    G = [torch.randn_like(w) for w in W0]
    params = [torch.nn.Parameter(w.clone()) for w in W0]
    opt = Muon([{"params": params, "head_split": split}], momentum=0.0, nesterov=False, **SVD)
    for p, grad in zip(params, G):
        p.grad = grad.clone()
    opt.step()
    dim = split[1]
    for p, w, grad in zip(params, W0, G):
        blocks = [polar_svd(b) for b in blocks_of(grad)]
        D = torch.cat([scale_of(b.shape, "match_rms_adamw") * b for b in blocks], dim=dim)
        assert ((p.detach() - (w * (1 - LR * WD) - LR * D)).norm() / w.norm()).item() < 1e-12
    whole = polar_svd(G[0])
    assert (torch.cat(blocks_of(whole), dim=dim) - torch.cat([polar_svd(b) for b in blocks_of(G[0])], dim=dim)).norm() > 0.1


def test_the_update_tail_takes_a_variants_scale_rule():
    assert isinstance(Muon([torch.nn.Parameter(torch.zeros(4, 4))]).scale, ScaleByShape)
    assert AdaMuon([torch.nn.Parameter(torch.zeros(4, 4))]).scale == ScaleToRms(0.2)


def test_adamuon_update_has_rms_0_2():
    p = torch.nn.Parameter(torch.zeros(24, 12, dtype=torch.float64))
    opt = AdaMuon([p], lr=1.0, weight_decay=0.0)
    p.grad = torch.randn(24, 12, dtype=torch.float64)
    opt.step()
    assert p.detach().square().mean().sqrt().item() == pytest.approx(0.2, rel=1e-6)


def test_dion_rank_fraction_outside_the_interval_is_refused():
    with pytest.raises(ValueError, match=r"rank_fraction=0.0 must be in \(0, 1\]"):
        Dion([torch.nn.Parameter(torch.zeros(4, 4))], rank_fraction=0.0)
