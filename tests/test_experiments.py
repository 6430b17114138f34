"""Every paper setting composes, validates and builds, with each optimizer's pinned hyperparameters."""

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import ROOT
from models import build_model
from trainer.config import compose
from trainer.optimizers import build_optimizer
from trainer.plan import make_plan

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
TUNED = [(e, p.stem) for e in EXPERIMENTS for p in sorted((ROOT / "configs" / "tuning" / e).glob("*.yaml"))]


def pinned(experiment: str, optim: str) -> dict:
    """The tuning file's own optim entries, following its defaults (another tuning file)."""
    data = yaml.safe_load((ROOT / "configs" / "tuning" / experiment / f"{optim}.yaml").read_text()) or {}
    for parent in data.pop("defaults", []):
        parent = str(parent).split("@")[0]
        base = pinned(*(parent.lstrip("/").split("/")[1:3]) if parent.startswith("/") else (experiment, parent))
        data = {**base, **data, "optim": {**base.get("optim", {}), **data.get("optim", {})}}
    return data


def test_every_paper_setting_is_there():
    expected = {"mars_m_gpt2_small_owt", "mars_m_gpt2_medium_owt", "mars_m_gpt2_large_owt", "vam_gpt2_small_owt",
                "vam_llama_130m_c4", "vam_llama_350m_c4", "vam_llama_1b_c4", "muon2_llama_60m_c4", "muon2_llama_130m_c4",
                "muon2_llama_350m_c4", "muon2_llama_1b_c4", "denoise_gpt2_small_owt", "denoise_llama_350m_c4", "cpu_repro"}
    assert expected <= set(EXPERIMENTS)
    for experiment in expected - {"cpu_repro"}:
        tuned = {o for e, o in TUNED if e == experiment}
        assert {"adamw", "muon"} <= tuned, experiment  # the baselines of every setting


@pytest.mark.parametrize("experiment,optim", TUNED)
def test_setting_composes_validates_and_builds(experiment, optim):
    cfg = compose([f"experiment={experiment}", f"optim={optim}"])
    for world_size in (1,) if experiment == "cpu_repro" else (8, 1):  # the papers' runs use 8 GPUs: the batch must divide
        make_plan(cfg, world_size=world_size)
    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    optimizer = build_optimizer(model, cfg.optim)
    expected = pinned(experiment, optim)["optim"]
    assert optimizer.param_groups[0]["lr"] == expected["lr"] == cfg.optim.lr
    for key, value in expected.get("matrix", {}).items():
        assert cfg.optim.matrix[key] == value, key


def test_paper_numbers_reach_the_run():
    mars = compose(["experiment=mars_m_gpt2_small_owt", "optim=mars_m"])
    assert (mars.optim.lr, mars.optim.weight_decay, mars.optim.matrix.gamma) == (6e-3, 0.01, 0.025)
    assert make_plan(mars, 8).total_steps == 100_000 and mars.data.batch_tokens == 491_520
    nsr = compose(["experiment=vam_llama_130m_c4", "optim=muon_nsr"])
    assert nsr.optim.matrix.gamma == 1000.0 and make_plan(nsr, 1).total_steps == 5_000
    muon2 = compose(["experiment=muon2_llama_60m_c4", "optim=muon2"])
    assert muon2.optim.matrix.ns_steps == 3 and compose(["experiment=muon2_llama_60m_c4", "optim=muon"]).optim.matrix.ns_steps == 5
    assert make_plan(muon2, 1).total_steps == 10_000
    pre = compose(["experiment=denoise_gpt2_small_owt", "optim=pre_polar"])
    assert pre.optim.matrix.nesterov is False and pre.model.n_layer == 12


def test_an_untuned_optimizer_keeps_its_own_defaults():
    cfg = compose(["experiment=mars_m_gpt2_small_owt", "optim=muon2"])
    assert cfg.optim.lr == compose(["optim=muon2"]).optim.lr
