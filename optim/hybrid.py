"""Routing parameters to optimizers, and the container that holds them as one Optimizer.

Every trainable parameter gets exactly one *role*, decided by its module and its name (never by
``ndim`` alone: a tied LM head and an embedding are 2-D but are not hidden matrices):

    matrix      weights of the hidden nn.Linear layers              -> the matrix optimizer (Muon, ...)
    embedding   nn.Embedding weights and the LM head (tied or not)  -> AdamW
    vector      norm gains and all biases                           -> AdamW without weight decay

The first matching rule wins. A parameter no rule matches, or one parameter reached under two names
that would get different roles, is an error that names it. ``HybridOptimizer`` then presents the
optimizers as a single ``torch.optim.Optimizer`` — its param_groups *are* theirs and its state *is*
theirs — so one LR scheduler, gradient clipping and checkpointing all work unchanged::

    opt = hybrid_optimizer(model, matrix=partial(Muon, lr=0.02), aux=partial(torch.optim.AdamW, lr=3e-4))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim import Optimizer

from optim.stages import Orthogonalize

ROLES = ("matrix", "embedding", "vector")
NO_WEIGHT_DECAY_ROLES = ("vector",)


class RoutingError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    """Matches a parameter by the type of the module that owns it and/or a regex on its full name."""

    role: str
    modules: tuple[type, ...] = ()
    name: str | None = None

    def matches(self, module: nn.Module, full_name: str) -> bool:
        if self.modules and not isinstance(module, self.modules):
            return False
        return self.name is None or re.search(self.name, full_name) is not None


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("embedding", modules=(nn.Embedding,)),
    Rule("embedding", name=r"(^|\.)lm_head\.weight$"),
    Rule("vector", modules=(nn.LayerNorm, nn.RMSNorm)),
    Rule("vector", name=r"(^|\.)bias$"),
    Rule("matrix", modules=(nn.Linear,), name=r"(^|\.)weight$"),
)


@dataclass
class Route:
    role: str
    param: nn.Parameter
    names: list[str]  # every name the parameter is reachable under (tied weights have several)


def route_parameters(model: nn.Module, rules: Sequence[Rule] = DEFAULT_RULES) -> list[Route]:
    """One Route per unique trainable parameter, in model order; raises RoutingError on any gap."""
    routes: dict[int, Route] = {}
    unassigned, conflicts = [], []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if not param.requires_grad:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            role = next((rule.role for rule in rules if rule.matches(module, full_name)), None)
            if role is None:
                unassigned.append(f"{full_name} ({type(module).__name__}, shape {tuple(param.shape)})")
            elif id(param) not in routes:
                routes[id(param)] = Route(role, param, [full_name])
            elif full_name not in routes[id(param)].names:
                route = routes[id(param)]
                if route.role != role:
                    conflicts.append(f"{full_name} is {route.names[0]} (role {route.role!r}) but its own rule says {role!r}")
                route.names.append(full_name)
    problems = []
    if unassigned:
        problems.append("no routing rule matches: " + ", ".join(unassigned))
    if conflicts:
        problems.append("assigned twice: " + "; ".join(conflicts))
    if problems:
        rules_text = ", ".join(f"{r.role}<-{'/'.join(m.__name__ for m in r.modules) or '*'}{' ' + r.name if r.name else ''}" for r in rules)
        raise RoutingError(" | ".join(problems) + f" | rules (first match wins): {rules_text}")
    return list(routes.values())


def param_groups(routes: list[Route]) -> dict[str, dict]:
    """{role: param group} with the group's `name` set to the role; vector roles get weight_decay 0."""
    groups = {}
    for role in ROLES:
        params = [r.param for r in routes if r.role == role]
        if params:
            groups[role] = {"params": params, "name": role}
            if role in NO_WEIGHT_DECAY_ROLES:
                groups[role]["weight_decay"] = 0.0
    return groups


class HybridOptimizer(Optimizer):
    """Several optimizers over disjoint parameters, exposed as one.

    ``param_groups`` is the concatenation of the parts' groups (the same dict objects, so a scheduler
    that sets ``group["lr"]`` drives every part) and all parts share this optimizer's ``state``, so
    ``state_dict()`` is the standard format over all parameters.
    """

    def __init__(self, parts: dict[str, Optimizer]):
        seen: dict[int, str] = {}
        for part_name, opt in parts.items():
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise RoutingError(f"a parameter of shape {tuple(p.shape)} is in both {seen[id(p)]!r} and {part_name!r}")
                    seen[id(p)] = part_name
        self.parts = dict(parts)
        all_params = [p for opt in parts.values() for g in opt.param_groups for p in g["params"]]
        super().__init__(all_params, defaults={})  # sets up hooks and bookkeeping
        self._share_groups_and_state()

    def _share_groups_and_state(self) -> None:
        groups = []
        for opt in self.parts.values():
            groups.extend(opt.param_groups)
            opt.state = self.state
        self.param_groups = groups

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state mapping
        groups = iter(self.param_groups)
        for opt in self.parts.values():
            opt.param_groups = [next(groups) for _ in opt.param_groups]
        self._share_groups_and_state()

    @property
    def needs_lookahead(self) -> bool:
        """Whether a part needs the gradient at the current weights on the next batch (exact MARS-M)."""
        return any(getattr(opt, "needs_lookahead", False) for opt in self.parts.values())

    def split_orthogonalization(self, process_group=None) -> None:
        """Under DDP: the matrix parts divide their orthogonalization among the replicas' ranks."""
        for opt in self.parts.values():
            if hasattr(opt, "split_orthogonalization"):
                opt.split_orthogonalization(process_group)

    def consolidate_state_dict(self) -> None:
        """Every rank calls it before state_dict() (Lightning does, before saving): the matrix parts bring to
        every rank the state their owner ranks alone kept current (optim/matrix.py)."""
        for opt in self.parts.values():
            if hasattr(opt, "consolidate_state_dict"):
                opt.consolidate_state_dict()

    def state_dict(self) -> dict:
        for opt in self.parts.values():
            if hasattr(opt, "require_whole_state"):
                opt.require_whole_state()
        return super().state_dict()

    def store_lookahead_gradients(self) -> None:
        for opt in self.parts.values():
            if getattr(opt, "needs_lookahead", False):
                opt.store_lookahead_gradients()

    def __repr__(self) -> str:
        return "HybridOptimizer(" + ", ".join(f"{k}={type(v).__name__}" for k, v in self.parts.items()) + ")"


def split_by_heads(group: dict, head_splits: dict) -> list[dict]:
    """The matrix group divided into the matrices orthogonalized whole ("matrix") and, per attention
    layout, those orthogonalized per head: "matrix_head_rows" (q, k, v, fused qkv: `head_split`
    (blocks, 0)) and "matrix_head_cols" (output projections: (heads, 1))."""
    by_split: dict = {}
    for p in group["params"]:
        by_split.setdefault(head_splits.get(p), []).append(p)
    groups = []
    for split, params in by_split.items():
        if split is None:
            groups.append({**group, "params": params})
        else:
            groups.append({**group, "params": params, "head_split": tuple(split),
                           "name": f"{group['name']}_head_{'rows' if split[1] == 0 else 'cols'}"})
    return groups


def hybrid_optimizer(
    model: nn.Module,
    matrix: Callable[[list[dict]], Optimizer],
    aux: Callable[[list[dict]], Optimizer],
    rules: Sequence[Rule] = DEFAULT_RULES,
    split_heads: bool = False,
) -> HybridOptimizer:
    """matrix(groups) for the hidden matrices, aux(groups) for embeddings, head, norms and biases.
    split_heads: the attention matrices the model lists in ``head_splits()`` are orthogonalized per head."""
    groups = param_groups(route_parameters(model, rules))
    parts = {}
    if "matrix" in groups:
        matrix_groups = [groups.pop("matrix")]
        if split_heads:
            if not hasattr(model, "head_splits"):
                raise RoutingError(f"split_heads: {type(model).__name__} has no head_splits() naming its attention heads")
            matrix_groups = split_by_heads(matrix_groups[0], model.head_splits())
        parts["matrix"] = matrix(matrix_groups)
        if split_heads and not any(isinstance(st, Orthogonalize) for st in getattr(parts["matrix"], "stages", ())):
            raise RoutingError(f"split_heads: {type(parts['matrix']).__name__} does not orthogonalize; "
                               "per-head blocks apply to the matrix optimizers of optim/")
    if groups:
        parts["aux"] = aux(list(groups.values()))
    return HybridOptimizer(parts)


def routing_table(model: nn.Module, optimizer: HybridOptimizer, rules: Sequence[Rule] = DEFAULT_RULES) -> str:
    """A printable table: role, optimizer, lr, weight decay, tensor and parameter counts, examples."""
    routes = route_parameters(model, rules)
    part_of = {id(g): (name, type(opt).__name__) for name, opt in optimizer.parts.items() for g in opt.param_groups}
    rows = [("group", "optimizer", "lr", "wd", "tensors", "params", "e.g.")]
    for group in optimizer.param_groups:
        members = {id(p) for p in group["params"]}
        names = [" = ".join(r.names) for r in routes if id(r.param) in members]
        rows.append((
            group.get("name", "?"), part_of[id(group)][1], f"{group['lr']:.3g}", f"{group.get('weight_decay', 0):.3g}",
            str(len(group["params"])), f"{sum(p.numel() for p in group['params']):,}",
            ", ".join(names[:2]) + (f", ... (+{len(names) - 2})" if len(names) > 2 else ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows)
