"""What every matrix optimizer shares: 2-D parameters, a pipeline of stages (optim/stages.py) that
turns the gradient into a direction D, then the update tail (an update-scale rule, decoupled weight
decay and the lr, applied in place in one pass: optim/stages.py's apply_update_).

For each matrix W of shape (m, n) in PyTorch layout (m = fan_out, n = fan_in):

    D = stage_k( ... stage_1(G) )
    W ← W − η (s(m, n) D + λ W)    = W (1 − η λ) − η s(m, n) D: decoupled decay with the *unscaled* η
                                   (cautious_weight_decay: λ W only where D ⊙ W > 0)

with the scale rule s(m, n) (`adjust_lr_fn`, torch.optim.Muon's name for it):
    "original"          sqrt(max(1, m/n))       Keller Jordan; RMS of s·polar = 1/sqrt(n)
    "match_rms_adamw"   0.2 · sqrt(max(m, n))   Moonlight; RMS 0.2, so AdamW's lr and wd carry over
    "spectral"          sqrt(m/n)               Dion's default
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch.optim import Optimizer

from optim.distributed import broadcast_from_owners, divides_replicas
from optim.orthogonalize import Orthogonalizer
from optim.stages import ScaleByShape, Stage, Step, UpdateScale, apply_update_, update_scale

# hyperparameter -> (lowest, highest, highest included?)
RANGES = {
    "lr": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, False),
    "momentum": (0.0, 1.0, False),
    "beta2": (0.0, 1.0, False),
    "gamma": (0.0, math.inf, False),
    "eps": (0.0, math.inf, False),
}


def check_group(name: str, group: dict, orthogonalizer: Orthogonalizer) -> None:
    """ValueError naming the first hyperparameter outside its range (or an invalid orthogonalizer).
    The group's ``orthogonalizer`` (an Orthogonalizer, or a mapping of some of its fields, the rest
    those of the optimizer's default `orthogonalizer`) becomes the plain dict of all its fields, which
    the Orthogonalize stage reads and checkpoints keep."""
    for key, (low, high, high_included) in RANGES.items():
        if key in group:
            value = group[key]
            if not (low <= value <= high if high_included else low <= value < high):
                interval = f"[{low:g}, {high:g}{']' if high_included else ')'}"
                raise ValueError(f"{name}: {key}={value} must be in {interval}")
    update_scale((1, 1), group.get("adjust_lr_fn"))
    if "orthogonalizer" in group:
        try:
            group["orthogonalizer"] = Orthogonalizer.of(group["orthogonalizer"], base=orthogonalizer).settings()
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None


def constructor_defaults(cls: type) -> dict:
    """Every keyword default of `cls`'s constructor, following ``**kwargs`` to the parent's (PrePolar
    is Muon with another default for nesterov)."""
    defaults = {}
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} | defaults
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return defaults
    return defaults


class MatrixOptimizer(Optimizer):
    """A torch.optim.Optimizer over 2-D matrices that runs `stages` on each group's gradients, then the
    update tail with the scale rule `scale` (optim/stages.py's apply_update_: W ← W (1 − η λ) − η s D)."""

    def __init__(self, params, defaults: dict, stages: Sequence[Stage], scale: UpdateScale = ScaleByShape()):
        super().__init__(params, defaults)
        self.stages, self.scale = tuple(stages), scale
        self.replicated_over = None
        self._counts: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}  # see _advance_counts
        self._on_owners_only: tuple[dict, dict[int, tuple]] = (self.state, {})  # see _owners_keep
        orthogonalizer = constructor_defaults(type(self)).get("orthogonalizer")  # Muon²'s has 3 steps
        for group in self.param_groups:
            check_group(type(self).__name__, group, orthogonalizer)
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"{type(self).__name__} updates 2-D matrices only; got a parameter of shape "
                        f"{tuple(p.shape)} (route embeddings' neighbours, norms and biases to AdamW)"
                    )

    def _advance_counts(self, params: list[torch.Tensor]) -> list[int]:
        """Each matrix's update count t, this step included. state["step"] (a CPU tensor, as in torch's
        optimizers) is what checkpoints keep; a host copy beside it spares every step a read of it,
        which is taken again only after the state was replaced (a checkpoint loaded)."""
        counts = []
        for p in params:
            state = self.state[p]
            tensor, count = self._counts.get(p, (None, 0))
            if tensor is None or state.get("step") is not tensor:
                count = int(state["step"]) if "step" in state else 0
            state["step"] = torch.tensor(float(count + 1))
            self._counts[p] = (state["step"], count + 1)
            counts.append(count + 1)
        return counts

    def split_orthogonalization(self, process_group=None) -> None:
        """Declare the parameters identical replicas over `process_group` (default: the world), as under
        DDP: each rank then orthogonalizes its share of the matrices and broadcasts the results
        (optim/distributed.py); state that only a matrix's owner needs (Dion's M and Q) stays current there
        until consolidate_state_dict(). FSDP2's sharded parameters are divided among ranks without this."""
        import torch.distributed as dist

        self.replicated_over = process_group if process_group is not None else dist.group.WORLD

    def _owners_keep(self, index: int, params: list[torch.Tensor]) -> None:
        """Note that group `index`'s `params` leave this step with the stages' ``owner_only_state`` current on
        their owner ranks only (DDP replicas dividing their matrices). Owners follow the shapes of the matrices
        with gradients: if those changed since the group's last step, the state is first brought to every rank."""
        if not any(stage.owner_only_state for stage in self.stages) or not divides_replicas(params, self.replicated_over):
            return
        stale = self._stale()
        if index in stale and [id(p) for p in stale[index]] != [id(p) for p in params]:
            self.consolidate_state_dict()
        stale[index] = tuple(params)

    def _stale(self) -> dict[int, tuple]:
        """group index -> the matrices whose owner-only state other ranks hold stale; empty once the state
        object was replaced (a checkpoint loaded: every rank loaded the same)."""
        if self._on_owners_only[0] is not self.state:
            self._on_owners_only = (self.state, {})
        return self._on_owners_only[1]

    def consolidate_state_dict(self) -> None:
        """Bring to every rank the state that DDP replicas dividing their matrices keep current on each
        matrix's owner only (Dion's M and Q): one broadcast per tensor from its owner. Every rank calls it,
        as torch's ZeroRedundancyOptimizer protocol has it: Lightning does before it saves a checkpoint.
        A no-op otherwise."""
        stale = self._stale()
        for params in stale.values():
            broadcast_from_owners([[self.state[p][name] for p in params] for name in self._owner_only_names()], self.replicated_over)
        stale.clear()

    def _owner_only_names(self) -> list[str]:
        return [f"{stage.namespace}/{name}" for stage in self.stages for name in stage.owner_only_state]

    def require_whole_state(self) -> None:
        """Raise if some state is current on its owner rank only (see consolidate_state_dict)."""
        if self._stale():
            raise RuntimeError(f"{type(self).__name__}'s {', '.join(self._owner_only_names())} are current on each matrix's owner "
                               "rank only (DDP replicas dividing their matrices: split_orthogonalization()); call "
                               "consolidate_state_dict() on every rank before state_dict()")

    def state_dict(self) -> dict:
        self.require_whole_state()
        return super().state_dict()

    def directions(self, group: dict, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Run the stages on the group's gradients: the direction D of each matrix, and the scale rule's
        s for each; advances each matrix's step count."""
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        step = Step(group=group, params=params, grads=grads, states=states, counts=self._advance_counts(params),
                    replicated_over=self.replicated_over)
        updates = grads
        for i, stage in enumerate(self.stages):
            step.last = i == len(self.stages) - 1
            updates = stage(updates, step)
        return updates, self.scale(updates, step)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            self._owners_keep(index, params)
            apply_update_(params, *self.directions(group, params), group)
        return loss
