"""The optimizer of a run, from the `optim` config group: `optim.matrix` for the hidden matrices,
`optim.aux` for embeddings, head, norms and biases (optim/hybrid.py routes them)."""

from __future__ import annotations

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf

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


def hyperparameter_problems(optim_cfg: DictConfig) -> list[str]:
    """'key=value is not a number' for every optimizer argument whose Python default is a number (or a
    flag, or a tuple of numbers) and whose configured value is not, named where the user sets it
    (`optim.lr`, not the `optim.matrix.lr` that refers to it)."""
    from hydra.utils import get_class

    from optim.matrix import constructor_defaults

    problems = {}
    for part in ("matrix", "aux"):
        if OmegaConf.is_interpolation(optim_cfg, part):  # optim=adamw's matrix: ${.aux}, checked as aux
            continue
        node = optim_cfg[part]
        try:
            target = get_class(node._target_)
        except Exception:  # an unknown _target_: _factory reports it
            continue
        for key, default in constructor_defaults(target).items():
            if key not in node or _same_kind(OmegaConf.select(node, key), default):
                continue
            kind = "true or false" if isinstance(default, bool) else "a number" if isinstance(default, (int, float)) else \
                   f"a list of {len(default)} numbers"
            where = _where_set(optim_cfg, part, key)
            problems.setdefault(where, f"{where}={OmegaConf.select(node, key)!r} is not {kind} "
                                       f"({node._target_}'s {key}; its default: {default!r})")
    return list(problems.values())


def _same_kind(value, default) -> bool:
    """Whether value can stand where `default` stands; only numbers, flags and tuples of numbers are checked."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(default, bool):
        return isinstance(value, bool)
    if number(default):
        return number(value)
    if isinstance(default, tuple) and default and all(map(number, default)):
        return isinstance(value, (list, tuple, ListConfig)) and len(value) == len(default) and all(map(number, value))
    return True


def _where_set(optim_cfg: DictConfig, part: str, key: str) -> str:
    """The config key a user sets for optim.<part>.<key>: the key it interpolates (${..lr} -> optim.lr), or itself."""
    raw = OmegaConf.to_container(optim_cfg[part], resolve=False)[key]
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and ":" not in raw:
        reference = raw[2:-1]
        dots = len(reference) - len(reference.lstrip("."))
        if not dots:
            return reference
        base = ["optim", part][: max(0, 2 - (dots - 1))]
        return ".".join(base + [reference.lstrip(".")])
    return f"optim.{part}.{key}"


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
