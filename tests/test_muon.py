"""Parity with torch.optim.Muon (the equations, state and errors of every optimizer: test_optimizers.py)."""

import pytest
import torch

from optim import Muon

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
    ours = trajectory(lambda ps: Muon(ps, orthogonalizer={"dtype": "float64"}, **kwargs))
    reference = trajectory(lambda ps: torch.optim.Muon(ps, **kwargs))
    start = trajectory(lambda ps: torch.optim.SGD(ps, lr=0.0))
    for o, r, s in zip(ours, reference, start):
        assert (o - r).norm() / (r - s).norm() < 1e-6  # relative to the total change of the weights
