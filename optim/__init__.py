"""Matrix optimizers for LLM pretraining, in pure torch (no Lightning, no Hydra).

    from optim import Muon, MuonNSR, hybrid_optimizer
    opt = MuonNSR([p for p in model.parameters() if p.ndim == 2], lr=0.02, gamma=10.0)

Every named optimizer is a composition of the stages in optim/stages.py; its docstring gives the
equations, the paper and the choices made where the references disagree.
"""

from optim.denoise import PolarOnly, PostPolar, PrePolar
from optim.hybrid import DEFAULT_RULES, HybridOptimizer, RoutingError, Rule, hybrid_optimizer, route_parameters, routing_table
from optim.mars_m import MARSM
from optim.matrix import MatrixOptimizer, update_scale
from optim.muon import Muon
from optim.muon2 import Muon2, Muon2F
from optim.orthogonalize import COEFFICIENTS, Orthogonalizer, newton_schulz, polar_svd
from optim.schedules import Schedule
from optim.variance_adaptive import MuonNSR, MuonVS

__all__ = [
    "COEFFICIENTS", "DEFAULT_RULES", "HybridOptimizer", "MARSM", "MatrixOptimizer", "Muon", "Muon2", "Muon2F", "MuonNSR",
    "MuonVS", "Orthogonalizer", "PolarOnly", "PostPolar", "PrePolar", "RoutingError", "Rule", "Schedule",
    "hybrid_optimizer", "newton_schulz", "polar_svd", "route_parameters", "routing_table", "update_scale",
]
