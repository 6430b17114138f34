import copy

import pytest
import torch

from optim import Muon
from optim.orthogonalize import polar_svd

SHAPES = [(32, 16), (16, 48), (24, 24)]


def trajectory(make_optimizer, steps=10, seed=0):
    """Run `steps` updates on fixed matrices with a fixed gradient sequence; return the params."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in SHAPES]
    grads = [[torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    opt = make_optimizer(params)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.fixture
def torch_muon_in_float64(monkeypatch):
    """torch.optim.Muon casts to bfloat16 inside Newton–Schulz: make that cast a no-op."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())  # a copy, like a real cast


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_optim_muon_in_float64(torch_muon_in_float64, adjust_lr_fn, nesterov):
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours = trajectory(lambda ps: Muon(ps, ns_dtype="float64", **kwargs))
    reference = trajectory(lambda ps: torch.optim.Muon(ps, **kwargs))
    start = trajectory(lambda ps: torch.optim.SGD(ps, lr=0.0))
    for o, r, s in zip(ours, reference, start):
        assert (o - r).norm() / (r - s).norm() < 1e-6  # relative to the total change of the weights


def test_equations_with_exact_polar_factor():
    """One matrix, three steps, by hand: M = βM + (1-β)G, N = (1-β)G + βM, W -= η s polar(N) after decay."""
    beta, lr, wd = 0.9, 0.05, 0.2
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(12, 6, generator=g, dtype=torch.float64)
    grads = [torch.randn(12, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=lr, weight_decay=wd, momentum=beta, orthogonalizer="svd", adjust_lr_fn="original")
    W, M = W0.clone(), torch.zeros_like(W0)
    for G in grads:
        p.grad = G.clone()
        opt.step()
        M = beta * M + (1 - beta) * G
        N = (1 - beta) * G + beta * M
        W = W * (1 - lr * wd) - lr * (12 / 6) ** 0.5 * polar_svd(N)
    assert torch.allclose(p.detach(), W, atol=1e-12, rtol=0)


def test_moonlight_sum_momentum_gives_the_same_update():
    """N(EMA) = (1-β)·N(sum): Newton–Schulz removes the factor, so only ε could tell them apart."""
    beta = 0.95
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    M, B = torch.zeros(8, 8, dtype=torch.float64), torch.zeros(8, 8, dtype=torch.float64)
    for G in grads:
        M = beta * M + (1 - beta) * G
        B = beta * B + G
        assert torch.allclose(polar_svd((1 - beta) * G + beta * M), polar_svd(G + beta * B), atol=1e-10)


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=g))]
    grads = [torch.randn(6, 4, generator=g) for _ in range(6)]
    opt = Muon(params, lr=0.02)
    for G in grads[:3]:
        params[0].grad = G.clone()
        opt.step()
    saved_params, saved_state = copy.deepcopy(params), copy.deepcopy(opt.state_dict())
    for G in grads[3:]:
        params[0].grad = G.clone()
        opt.step()
    restored = Muon(saved_params, lr=0.02)
    restored.load_state_dict(saved_state)
    for G in grads[3:]:
        saved_params[0].grad = G.clone()
        restored.step()
    assert torch.equal(saved_params[0], params[0])
    assert set(saved_state["state"][0]) == {"momentum/buffer", "step"}


def test_refuses_non_matrix_parameters():
    with pytest.raises(ValueError, match=r"Muon updates 2-D matrices only; got a parameter of shape \(4,\)"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_bad_hyperparameters_are_refused_at_construction():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="unknown adjust_lr_fn 'rms'"):
        Muon(p, adjust_lr_fn="rms")
    with pytest.raises(ValueError, match=r"Muon: momentum=1.0 must be in \[0, 1\)"):
        Muon(p, momentum=1.0)
    with pytest.raises(ValueError, match="unknown Newton–Schulz coefficient set"):
        Muon(p, ns_coefficients="fast")
