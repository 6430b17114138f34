"""What a run is: a paper setting (`experiment=<name>`, which pins model, data, budget, lrs and a GPU
trainer) or the CPU default run's settings (tuned for gpt2_mini on Shakespeare), and what a
researcher must be told when the two are mixed:

    an experiment with an optimizer it has no tuning file for   an error (allow_untuned=true: a warning)
    a large model outside any experiment                         a warning naming what came from the default run
    a large model on the CPU trainer                             a warning (fp32 on the CPU: a smoke test)
    a streamed corpus with no data.max_tokens                    a warning (all of C4 is ~156B tokens, ~46 h)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from models import ModelConfigError, build_model, count_parameters
from configs import CONFIG_DIR

LARGE_MODEL = 60_000_000  # parameters; from here on the CPU default run's settings are not meant for the model


def tuned_optimizers(experiment: str) -> list[str] | None:
    """The optimizers `experiment` has a tuning file for; None if it has no tuning folder (e.g. `quick`)."""
    folder = CONFIG_DIR / "tuning" / experiment
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None


def _defaults(experiment: str) -> list:
    data = yaml.safe_load((CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()) or {}
    return data.get("defaults", [])


def model_of(experiment: str) -> str | None:
    """The model an experiment file selects (directly or through the experiment it builds on)."""
    for entry in _defaults(experiment):
        if isinstance(entry, Mapping) and "override /model" in entry:
            return entry["override /model"]
    parents = [e for e in _defaults(experiment) if isinstance(e, str) and e != "_self_"]
    return next((m for m in map(model_of, parents) if m), None)


@functools.cache
def experiments_by_model() -> dict[str, list[str]]:
    by_model: dict[str, list[str]] = {}
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        model = model_of(path.stem)
        if model:
            by_model.setdefault(model, []).append(path.stem)
    return by_model


def setting_problems(cfg: DictConfig) -> list[str]:
    """Configuration errors of the setting itself (reported with make_plan's)."""
    experiment, optim = cfg.get("experiment_name"), cfg.optim.name
    tuned = tuned_optimizers(experiment) if experiment else None
    if tuned is None or optim in tuned or cfg.get("allow_untuned"):
        return []
    return [f"experiment={experiment} has no tuning for optim={optim}: its lr would be the CPU default run's "
            f"optim.lr={cfg.optim.lr:g}, not a paper's. Tuned here: {', '.join(tuned)}. Pick one of those, add "
            f"configs/tuning/{experiment}/{optim}.yaml with its hyperparameters, or pass allow_untuned=true to run it anyway"]


def parameter_count(model_cfg: DictConfig) -> int | None:
    try:
        with torch.device("meta"):
            return count_parameters(build_model(OmegaConf.to_container(model_cfg, resolve=True))).total
    except (ModelConfigError, TypeError, ValueError):
        return None  # make_plan reports why


def _from_the_default_run(cfg: DictConfig) -> list[str]:
    optim = [f"optim.lr={cfg.optim.lr:g} (the default run's best)"]
    if "gamma" in cfg.optim.get("matrix", {}):
        optim.append(f"optim.matrix.gamma={cfg.optim.matrix.gamma:g} (configs/optim/{cfg.optim.name}.yaml's)")
    return [f"optim={cfg.optim.name}: " + ", ".join(optim),
            f"data={cfg.data.name}: data.seq_len={cfg.data.seq_len}, data.batch_tokens={cfg.data.batch_tokens:,}, "
            f"budget.tokens={cfg.budget.tokens:,}"]


def where_it_is_tuned(model: str, optim: str) -> str:
    """The paper settings to point a user of `model` with `optim` at: those with this model that tune this
    optimizer; else those that tune it at another size; else those with this model (for another optimizer)."""
    mention = lambda names: ", ".join(f"experiment={e}" for e in names)  # noqa: E731
    tunes = lambda e: optim in (tuned_optimizers(e) or [])  # noqa: E731
    pinned = experiments_by_model().get(model, [])
    here = [e for e in pinned if tunes(e)]
    if here:
        return f"the paper settings with this model that tune optim={optim} pin all of these and a GPU trainer: {mention(here)}"
    elsewhere = [e for es in experiments_by_model().values() for e in es if tunes(e) and e != "cpu_repro"]
    if elsewhere:
        return (f"no paper setting with this model tunes optim={optim}" + (f" ({mention(pinned)}: other optimizers)" if pinned else "")
                + f"; those that tune it, at their own sizes: {mention(elsewhere)}")
    if pinned:
        return f"no paper setting tunes optim={optim}; those with this model (for other optimizers): {mention(pinned)}"
    return "no experiment pins this model; `python train.py --help` lists the paper settings (experiment=...)"


def setting_warnings(cfg: DictConfig) -> list[str]:
    """Warnings to print before the run starts (empty for the default run and for a paper setting as pinned)."""
    warnings = []
    experiment, model = cfg.get("experiment_name"), cfg.model.get("name", "this model")
    if experiment and cfg.get("allow_untuned") and cfg.optim.name not in (tuned_optimizers(experiment) or [cfg.optim.name]):
        warnings.append(f"experiment={experiment} runs optim={cfg.optim.name} untuned (allow_untuned=true): "
                        f"optim.lr={cfg.optim.lr:g} is the CPU default run's, not a paper's")
    params = parameter_count(cfg.model)
    if params is not None and params >= LARGE_MODEL:
        size = f"model={model} ({params / 1e6:.1f}M parameters)"
        if not experiment:
            lines = [f"{size} runs with the settings of the CPU default run, tuned for gpt2_mini on Shakespeare, not a paper's:",
                     *(f"  - {line}" for line in _from_the_default_run(cfg)), f"  {where_it_is_tuned(model, cfg.optim.name)}"]
            warnings.append("\n".join(lines))
        if cfg.trainer.accelerator == "cpu":
            warnings.append(f"{size} on trainer=cpu: fp32 on the CPU, a smoke test at best; trainer=gpu (bf16), ddp or "
                            f"fsdp run it on GPUs")
    if cfg.data.get("streaming") and cfg.data.get("max_tokens") is None:
        warnings.append(f"data={cfg.data.name} with data.max_tokens=null prepares its whole train split (all of C4 is "
                        f"~156B tokens, ~46 h to tokenize, longer than the SLURM presets' 24 h); this budget needs "
                        f"data.max_tokens={int(cfg.budget.tokens) + int(cfg.data.seq_len)}")
    return warnings
