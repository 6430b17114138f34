"""The run's last checkpoint: written atomically, verified before resuming.

`<run_dir>/checkpoints/last.ckpt` is a Lightning checkpoint (weights, optimizer and scheduler state,
loop counters) plus a `muonlab` entry with the resolved config, step, tokens and the metrics.csv rows
up to that step (a resumed run rewrites a lost or damaged metrics.csv from them). It is one full file
under every strategy (FSDP gathers it on rank 0), with optimizer state numbered by the parameter's
position in the module, as Lightning's FSDP2 loader expects, so a checkpoint of any strategy and
world size resumes under any other. It is first written
to a temporary sibling, flushed to disk, then renamed over the old one, so a run killed at any
moment leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.files import atomic_file
from trainer.errors import CheckpointError
from trainer.metrics import MetricsError, read_metrics

FORMAT = 2  # 2: the metrics.csv rows up to the checkpoint's step are kept in it
# config entries that define the training trajectory: resuming with any of them changed is refused
TRAJECTORY_KEYS = ("model", "data.name", "data.kind", "data.source", "data.val_fraction", "data.val_head_tokens",
                   "data.seq_len", "data.batch_tokens", "data.seed", "data.eot", "data.packing", "tokenizer", "optim",
                   "schedule", "budget", "seed", "grad_clip")
# entries checkpoints written before they existed lack, with the value those runs had
ADDED_LATER = {"data.eot": "append", "data.packing": True}


def last_checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def save_atomic(trainer, path: Path) -> None:
    """trainer.save_checkpoint to a temporary file that rank 0 fsyncs and renames over `path`
    (data/files.py); all ranks call this and return once the new checkpoint is in place."""
    with atomic_file(path, rename=trainer.is_global_zero) as tmp:
        trainer.save_checkpoint(tmp, weights_only=False)
    trainer.strategy.barrier()


def renumber_optimizer_state(state: dict, new_id: dict[int, int]) -> dict:
    """The optimizer state dict with every parameter id (state keys and each group's `params`)
    mapped through `new_id`. torch's load_state_dict matches parameters by their position in the
    groups, so any numbering loads; a fixed numbering lets other loaders match them by name."""
    return {**state, "state": {new_id[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [new_id[k] for k in g["params"]]} for g in state["param_groups"]]}


def number_by_position(checkpoint: dict, module: torch.nn.Module, optimizers: list) -> None:
    """Renumber the checkpoint's optimizer states by each parameter's position in `module` (as
    FSDP2 numbers them already), so a checkpoint of any strategy loads under any other. (Under DDP, ranks
    other than 0 have empty ones: Lightning consolidates the state onto rank 0, which writes the file.)"""
    position = {id(p): i for i, p in enumerate(module.parameters())}
    checkpoint["optimizer_states"] = [
        renumber_optimizer_state(state, {i: position[id(p)] for i, p in enumerate(p for g in opt.param_groups for p in g["params"])})
        if state else state for state, opt in zip(checkpoint["optimizer_states"], optimizers)
    ]


def align_batch_counters(progress: dict, step: int, batches_per_step: int) -> None:
    """Lightning counts micro-batches and decides where a step ends from that count. A run resumed
    on another world size has another number of micro-batches per step: shift the counters by
    what the steps done would have taken here, so the next step again starts at a step boundary."""
    if step == 0:
        return
    saved_per_step = progress["total"]["processed"] // step
    for counters in (progress["total"], progress["current"]):
        for key in counters:
            counters[key] += step * (batches_per_step - saved_per_step)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def trajectory_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every trajectory-defining entry that differs."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    if "tokenizer.name" not in saved_flat and current_flat.get("tokenizer.name") == "gpt2":  # GPT-2 was the only one
        saved_flat |= {k: v for k, v in current_flat.items() if k.startswith("tokenizer.")}
    saved_flat = ADDED_LATER | saved_flat
    if "budget.counts" not in saved_flat:  # budgets counted positions, which packed sequences hold no pads among
        saved_flat["budget.counts"] = "nonpad" if saved_flat["data.packing"] else "positions"
    keys = sorted(k for k in set(saved_flat) | set(current_flat) if any(k == t or k.startswith(t + ".") for t in TRAJECTORY_KEYS))
    return [f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in keys if saved_flat.get(k) != current_flat.get(k)]


def read_checkpoint_meta(path: Path) -> dict:
    """Open `path` (memory-mapped, cheap), check it is a complete muonlab checkpoint and return its
    `muonlab` entry (config, step, tokens). Raises CheckpointError with what to do otherwise."""
    path = Path(path)
    advice = f"Delete {path} to start this run over, or pass a new run_dir=..."
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, unpickling errors: all mean "unreadable"
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}). {advice}") from None
    missing = [k for k in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "muonlab") if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {missing}). {advice}")
    return checkpoint["muonlab"]


def verify_checkpoint(path: Path, config: dict) -> dict:
    """read_checkpoint_meta, and refuse a checkpoint whose trajectory-defining config differs."""
    meta = read_checkpoint_meta(path)
    differences = trajectory_differences(meta["config"], config)
    if differences:
        raise CheckpointError(
            f"run dir {Path(path).parent.parent} holds a checkpoint of a different configuration ("
            + "; ".join(differences) + "). Resume with the original settings, or pass a new run_dir=..."
        )
    return meta


def rows_to_resume(csv_path: Path, meta: dict, checkpoint: Path) -> tuple[list[dict], str | None]:
    """The metrics rows a run resumed from `checkpoint` (its `muonlab` entry: `meta`) starts from:
    the checkpoint's own copy, and a note when metrics.csv was missing, damaged or short of them (it
    is then rewritten). A checkpoint without a copy (format 1) resumes from the file's rows up to its
    step, and refuses a missing or damaged file rather than shorten the history."""
    step = meta["step"]
    try:
        on_disk, problem = [r for r in read_metrics(csv_path) if r["step"] <= step], None
    except FileNotFoundError:
        on_disk, problem = [], "is missing"
    except MetricsError as e:
        on_disk, problem = [], f"is damaged ({e})"
    saved = meta.get("metrics")
    if saved is None:
        if problem:
            raise CheckpointError(f"{csv_path} {problem}, and checkpoint {checkpoint} (written before checkpoints kept the "
                                  f"metrics rows) holds no copy of them. Restore {csv_path}, or pass resume=false to start over")
        return on_disk, None
    if problem is None and [r["step"] for r in on_disk] != [r["step"] for r in saved]:
        problem = f"holds {len(on_disk)} of the {len(saved)} rows up to step {step}"
    note = f"{csv_path} {problem}: rewritten from the {len(saved)} rows kept in {checkpoint}" if problem else None
    return list(saved), note
