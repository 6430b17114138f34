"""`callbacks=diagnostics`: spectral diagnostics of the running optimizer, as metrics.csv columns.

Every `every_steps` optimizer steps, for each monitored matrix W (default: the first attention and the
first MLP matrix of the first, middle and last block) with raw gradient G and the optimizer's
momentum buffer M (optim/spectral.py has the definitions):

    diag/<layer>/da<k>        DA_k(M), k = 1…ns_steps: how close k Newton–Schulz steps get to polar(M)
    diag/<layer>/da<k>_pre    DA_k of Muon²'s preconditioned input M/(sqrt(V)+ε) (Muon², Muon²-F only)
    diag/<layer>/cross        ⟨NS_K(M/(sqrt(V)+ε)), polar(M)⟩ / (…): "better approximation" or "other target"
    diag/<layer>/gap, rel_gap σ_r − σ_{r+1} of M, and over σ_1(M)
    diag/<layer>/filter       filtering ratio of M against G (< 1: momentum suppressed the tail)
    diag/<layer>/sin_left, sin_right
                              ‖sin Θ‖_2 between M's top-r singular subspaces now and at the last measurement
    diag/cost_s               seconds these measurements took (the callback's whole cost)

Float64 SVDs on rank 0 (under FSDP every rank helps gather the matrices); nothing else is slowed.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from optim.distributed import gather_whole
from optim.spectral import cross_alignment, directional_alignment, filtering_ratio, principal_angles, spectral_gap
from optim.stages import second_moment_preconditioned


def default_layers(model: torch.nn.Module) -> list[str]:
    """The first attention and the first MLP matrix of the first, middle and last block."""
    blocks = len(model.blocks)
    names = []
    for i in dict.fromkeys((0, blocks // 2, blocks - 1)):
        matrices = [n for n, p in model.blocks[i].named_parameters() if p.ndim == 2]
        for kind in ("attn.", "mlp."):
            names += [f"blocks.{i}.{n}" for n in matrices if n.startswith(kind)][:1]
    return names


def layer_diagnostics(G: torch.Tensor, M: torch.Tensor, state: dict, previous_M: torch.Tensor | None,
                      rank: int, ns_steps: int, eps: float | None = None) -> dict[str, float]:
    """The columns of one matrix. `state` holds its second moment if the optimizer keeps one (Muon²),
    and `eps` is then its group's ε: M/(sqrt(V)+ε) is what Newton–Schulz sees."""
    G, M = G.double(), M.double()
    out = {f"da{k}": v for k, v in enumerate(directional_alignment(M, steps=ns_steps), start=1)}
    pre = second_moment_preconditioned(M, state, eps)
    if pre is not None:
        out.update({f"da{k}_pre": v for k, v in enumerate(directional_alignment(pre, steps=ns_steps), start=1)})
        out["cross"] = cross_alignment(pre, M, steps=ns_steps)
    out["gap"], out["rel_gap"] = spectral_gap(M, rank)
    out["filter"] = filtering_ratio(M, G, rank)
    if previous_M is not None:
        angles = principal_angles(M, previous_M, rank)
        out["sin_left"], out["sin_right"] = angles["sin2_left"], angles["sin2_right"]
    return out


class SpectralDiagnostics(L.Callback):
    def __init__(self, every_steps: int = 40, rank: int = 4, ns_steps: int = 5, layers: list[str] | None = None):
        if not (isinstance(every_steps, int) and every_steps >= 1):
            raise ValueError(f"callbacks.diagnostics.every_steps={every_steps!r} must be an integer >= 1")
        self.every_steps, self.rank, self.ns_steps, self.layers = every_steps, rank, ns_steps, layers
        self._previous: dict[str, torch.Tensor] = {}
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # micro-batches before the first step boundary are not steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # runs before the module's hook, which writes this step's row
        if step == self._last_step:
            return
        self._last_step = step
        if step % self.every_steps:
            return
        started = time.perf_counter()
        model = pl_module.model
        params = dict(model.named_parameters())
        names = self.layers or default_layers(model)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"callbacks.diagnostics.layers: no parameter {unknown}; e.g. {list(params)[:4]}")
        optimizer = trainer.optimizers[0]
        group_of = {id(q): g for g in optimizer.param_groups for q in g["params"]}
        columns = {}
        for name in names:
            p = params[name]
            state = optimizer.state.get(p, {})
            if p.grad is None or "momentum/buffer" not in state:
                continue
            moments = {k: v for k, v in state.items() if k in ("second_moment/v", "second_moment/row", "second_moment/col")}
            G, M, *whole = gather_whole([p.grad, state["momentum/buffer"], *moments.values()])  # all ranks (FSDP)
            if not trainer.is_global_zero:
                continue
            local_state = dict(zip(moments, whole))
            short = name.removesuffix(".weight")
            values = layer_diagnostics(G, M, local_state, self._previous.get(name), self.rank, self.ns_steps,
                                       eps=group_of[id(p)].get("eps"))
            self._previous[name] = M.double().clone()
            columns.update({f"diag/{short}/{k}": v for k, v in values.items()})
        if trainer.is_global_zero:
            columns["diag/cost_s"] = time.perf_counter() - started
            pl_module.step_metrics.add(columns)
