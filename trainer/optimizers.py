"""The optimizer of a run, from the `optim` config group: `optim.matrix` for the hidden matrices,
`optim.aux` for embeddings, head, norms and biases (optim/hybrid.py routes them)."""

from __future__ import annotations

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from optim.hybrid import HybridOptimizer, hybrid_optimizer, routing_table
from trainer.errors import ConfigError


def _factory(optim_cfg: DictConfig, part: str):
    try:
        return hydra.utils.instantiate(optim_cfg[part], _partial_=True, _convert_="all")
    except InstantiationException as e:
        raise ConfigError(f"optim.{part}: {e}") from None


def build_optimizer(model, optim_cfg: DictConfig) -> HybridOptimizer:
    matrix, aux = _factory(optim_cfg, "matrix"), _factory(optim_cfg, "aux")
    try:
        return hybrid_optimizer(model, matrix=matrix, aux=aux, split_heads=bool(optim_cfg.split_heads))
    except (TypeError, ValueError) as e:  # bad hyperparameters (and RoutingError) surface when the optimizer is built
        raise ConfigError(f"optim={optim_cfg.name}: {e}") from None


def needs_lookahead(optim_cfg: DictConfig) -> bool:
    """Whether the matrix optimizer takes a look-ahead gradient, a second forward/backward per step
    (exact MARS-M): asked of the optimizer itself, built on one dummy matrix."""
    try:
        matrix = _factory(optim_cfg, "matrix")([torch.nn.Parameter(torch.zeros(2, 2))])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim={optim_cfg.name}: {e}") from None
    return bool(getattr(matrix, "needs_lookahead", False))


def print_routing(model, optimizer: HybridOptimizer, name: str) -> None:
    print(f"parameter routing (optim={name}):")
    print("  " + routing_table(model, optimizer).replace("\n", "\n  "), flush=True)
