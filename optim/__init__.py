"""Matrix optimizers for LLM pretraining, in pure torch (no Lightning, no Hydra).

    from optim import Muon, MuonNSR, hybrid_optimizer
    opt = MuonNSR([p for p in model.parameters() if p.ndim == 2], lr=0.02, gamma=10.0)

Every named optimizer is a composition of the stages in optim/stages.py (Muon, MARS-M, Muon-NSR/VS,
Muon²/Muon²-F, the three denoising pipelines, NorMuon, AdaMuon, Dion; QKClip adds MuonClip's
QK-clip to any of them); its docstring gives the equations, the paper and the choices made where the
references disagree.
"""

from optim.adamuon import AdaMuon
from optim.denoise import PolarOnly, PostPolar, PrePolar
from optim.dion import Dion
from optim.hybrid import DEFAULT_RULES, HybridOptimizer, RoutingError, Rule, hybrid_optimizer, route_parameters, routing_table
from optim.mars_m import MARSM
from optim.matrix import MatrixOptimizer
from optim.stages import update_scale
from optim.muon import Muon
from optim.muon2 import Muon2, Muon2F
from optim.normuon import NorMuon
from optim.orthogonalize import COEFFICIENTS, Orthogonalizer, newton_schulz, polar_svd
from optim.qk_clip import QKClip
from optim.schedules import Schedule
from optim.variance_adaptive import MuonNSR, MuonVS

__all__ = [
    "COEFFICIENTS", "DEFAULT_RULES", "AdaMuon", "Dion", "HybridOptimizer", "MARSM", "MatrixOptimizer", "Muon", "Muon2", "Muon2F",
    "MuonNSR", "MuonVS", "NorMuon", "Orthogonalizer", "PolarOnly", "PostPolar", "PrePolar", "QKClip", "RoutingError", "Rule",
    "Schedule",
    "hybrid_optimizer", "newton_schulz", "polar_svd", "route_parameters", "routing_table", "update_scale",
]
