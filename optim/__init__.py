"""Matrix optimizers for LLM pretraining, in pure torch (no Lightning, no Hydra).

    from optim import Muon, hybrid_optimizer
    opt = Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
"""

from optim.hybrid import DEFAULT_RULES, HybridOptimizer, RoutingError, Rule, hybrid_optimizer, route_parameters, routing_table
from optim.matrix import MatrixOptimizer, update_scale
from optim.muon import Muon
from optim.orthogonalize import COEFFICIENTS, Orthogonalizer, newton_schulz, polar_svd
from optim.schedules import Schedule

__all__ = [
    "COEFFICIENTS", "DEFAULT_RULES", "HybridOptimizer", "MatrixOptimizer", "Muon", "Orthogonalizer", "RoutingError",
    "Rule", "Schedule", "hybrid_optimizer", "newton_schulz", "polar_svd", "route_parameters", "routing_table",
    "update_scale",
]
