"""Every paper setting composes, validates and builds, with each optimizer's pinned hyperparameters."""

import functools

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import ROOT
from models import build_model
from configs import compose
from trainer.optimizers import build_optimizer
from trainer.errors import ConfigError
from trainer.plan import make_plan
from trainer.setting import setting_warnings

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


PAPER_SETTINGS = {
    "mars_m_gpt2_small_owt", "mars_m_gpt2_medium_owt", "mars_m_gpt2_large_owt", "mars_m_gpt2_xl_owt",
    "mars_m_gpt2_small_fineweb_edu", "mars_m_gpt2_medium_fineweb_edu", "mars_m_gpt2_large_fineweb_edu",
    "mars_m_gpt2_xl_fineweb_edu", "vam_gpt2_small_owt", "vam_gpt2_medium_owt", "vam_llama_130m_c4", "vam_llama_300m_c4",
    "vam_llama_520m_c4", "vam_llama_1.2b_c4", "vam_suite_a_210m", "vam_suite_a_720m", "muon2_llama_60m_c4",
    "muon2_llama_130m_c4", "muon2_llama_350m_c4", "muon2_llama_1b_c4", "muon2_gpt2_small_owt", "denoise_gpt2_small_owt",
    "denoise_llama_350m_c4",
}


def test_every_paper_setting_is_there():
    assert PAPER_SETTINGS | {"cpu_repro", "quick"} == set(EXPERIMENTS)
    for experiment in PAPER_SETTINGS:
        tuned = {o for e, o in TUNED if e == experiment}
        assert {"adamw", "muon"} <= tuned, experiment  # the baselines of every setting


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_names_itself_and_paper_settings_pin_a_gpu_trainer(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment  # a copied file that kept its parent's name would fail here
    if experiment in PAPER_SETTINGS:
        assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.compile, cfg.data.num_workers) == ("gpu", "bf16-mixed", True, 2)
        assert compose([f"experiment={experiment}", "trainer=cpu"]).trainer.accelerator == "cpu"  # a smoke test stays possible


@pytest.mark.parametrize("experiment", sorted(PAPER_SETTINGS))
def test_streamed_corpora_prepare_what_the_budget_needs(experiment):
    cfg = compose([f"experiment={experiment}"])
    if cfg.data.streaming or cfg.data.name == "fineweb":  # C4 (~156B tokens), FineWeb(-Edu): the budget and at most one spare sequence
        assert int(cfg.budget.tokens) < int(cfg.data.max_tokens) <= int(cfg.budget.tokens) + int(cfg.data.seq_len)
    else:  # OpenWebText (~9.0B tokens) is read whole for its held-out split, and the budgets need all of it
        assert cfg.data.name == "openwebtext" and cfg.data.max_tokens is None


def leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("experiment,optim", TUNED)
def test_setting_composes_validates_and_builds(experiment, optim):
    """Each tuning file builds, reaches the run, and writes only what differs from the config without it (its
    experiment, the optim file, the Python defaults): no second home for a value. Its lr is the tuned number,
    kept even where it equals the optim file's."""
    cfg = compose([f"experiment={experiment}", f"optim={optim}"])
    for world_size in (1,) if experiment == "cpu_repro" else (8, 1):  # the papers' runs use 8 GPUs: the batch must divide
        make_plan(cfg, world_size=world_size)
    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    optimizer = build_optimizer(model, cfg.optim)
    written = pinned(experiment, optim)["optim"]
    assert optimizer.param_groups[0]["lr"] == written["lr"] == cfg.optim.lr
    untuned = OmegaConf.to_container(compose([f"experiment={experiment}", f"optim={optim}", "~tuning@_global_"]).optim, resolve=True)
    tuned = OmegaConf.to_container(cfg.optim, resolve=True)
    for path, value in leaves(written):
        if path != ("lr",):
            at = lambda tree: functools.reduce(lambda node, key: node[key], path, tree)  # noqa: E731
            assert at(tuned) == value != at(untuned), ".".join(path)


def test_paper_numbers_reach_the_run():
    mars = compose(["experiment=mars_m_gpt2_small_owt", "optim=mars_m"])
    assert (mars.optim.lr, mars.optim.weight_decay, mars.optim.matrix.gamma) == (6e-3, 0.01, 0.025)
    assert make_plan(mars, 8).total_steps == 100_000 and mars.data.batch_tokens == 491_520
    nsr = compose(["experiment=vam_llama_130m_c4", "optim=muon_nsr"])
    assert nsr.optim.matrix.gamma == 1000.0 and make_plan(nsr, 1).total_steps == 5_000
    muon2 = compose(["experiment=muon2_llama_60m_c4", "optim=muon2"])
    assert muon2.optim.matrix.orthogonalizer.steps == 3 and compose(["experiment=muon2_llama_60m_c4", "optim=muon"]).optim.matrix.orthogonalizer.steps == 5
    assert make_plan(muon2, 1).total_steps == 10_000
    pre = compose(["experiment=denoise_gpt2_small_owt", "optim=pre_polar"])
    assert pre.optim.matrix.nesterov is False and pre.model.n_layer == 12


# AGI-Arena/MARS (4831e28) config/train_gpt2_{size}_adamw.py: (learning_rate, min_lr); MARS_M/config/
# train_gpt2_{size}_mars_m.py: (learning_rate, min_lr); MARS_M/README.md's FineWeb-Edu lr column
MARS = {"small": ("gpt2_125m", (6e-4, 3e-5), (6e-3, 3e-5), 1e-2), "medium": ("gpt2_350m", (3e-4, 6e-5), (5e-3, 6e-5), 5e-3),
        "large": ("gpt2_774m", (2e-4, 1e-5), (5e-3, 1e-5), 5e-3), "xl": ("gpt2_1.5b", (2e-4, 1e-5), (3e-3, 1e-5), 3e-3)}


@pytest.mark.parametrize("size", MARS)
def test_mars_m_settings_are_the_released_configs(size):
    model, adamw, mars_m, fineweb_lr = MARS[size]
    for corpus, lr in (("owt", mars_m[0]), ("fineweb_edu", fineweb_lr)):
        experiment = f"mars_m_gpt2_{size}_{corpus}"
        for optim, (peak, floor) in (("adamw", adamw), ("mars_m", (lr, mars_m[1])), ("muon", (lr, mars_m[1]))):
            cfg = compose([f"experiment={experiment}", f"optim={optim}"])
            assert cfg.model.name == model and cfg.data.name == ("openwebtext" if corpus == "owt" else "fineweb_edu")
            assert cfg.optim.lr == pytest.approx(peak) and cfg.optim.lr * cfg.schedule.min_lr_ratio == pytest.approx(floor)
            assert cfg.model.scale_attn_by_inverse_layer_idx is True  # every MARS training script's default
            assert (cfg.model.bias, cfg.grad_clip, make_plan(cfg, 8).total_steps) == (False, 1.0, 100_000)
        assert compose([f"experiment={experiment}", "optim=adamw"]).optim.aux.betas == [0.9, 0.95]
        assert compose([f"experiment={experiment}", "optim=muon"]).optim.weight_decay == 0.1  # Moonlight configs


@pytest.mark.parametrize("size,micro,accumulation", [("small", 15, 4), ("medium", 4, 15)])
def test_variance_adaptive_gpt2_is_their_model_and_recipe(size, micro, accumulation):
    """jingru-lee/Variance-Adaptive-Muon NanoGPT/gpt2 (75f78ad): config/{size}_*.py, models/model.py, models/train.py."""
    cfg = compose([f"experiment=vam_gpt2_{size}_owt", "optim=muon_nsr"])
    assert (cfg.model.pos, cfg.model.tie_head, cfg.model.bias, cfg.model.vocab_size) == ("rope", False, False, 50304)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.matrix.gamma, cfg.optim.matrix.eps) == (6e-4, 0.1, 10.0, 1e-8)
    assert cfg.data.micro_batch == micro and cfg.data.batch_tokens == micro * accumulation * 8 * 1024
    assert cfg.grad_clip == pytest.approx(1.0 / accumulation)  # their clip 1.0 on a gradient summed over micro-batches
    assert cfg.schedule.kind == "constant" and make_plan(cfg, 8).total_steps == 100_000
    with torch.device("meta"):
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True))
    assert model.wpe is None and model.lm_head.weight is not model.wte.weight


# Suite_B/run.sh: (lr, AdamW lr multiplier, momentum, sequences per step, steps, grad clip); 520m from Marin's
# experiments/optimizer_sweep/PhaseI/exp725_muonsweep_520M_1.py
SUITE_B = {"130m": (1.6e-2, 0.2, 0.95, 128, 5000, 1.0), "300m": (8e-3, 0.3, 0.98, 128, 11500, 1.0),
           "520m": (8e-3, 0.3, 0.98, 128, 20480, 1.0), "1.2b": (8e-3, 0.15, 0.98, 256, 23000, 2.0)}


@pytest.mark.parametrize("size", SUITE_B)
def test_suite_b_settings_run_marins_models(size):
    lr, multiplier, momentum, seqs, steps, clip = SUITE_B[size]
    cfg = compose([f"experiment=vam_llama_{size}_c4", "optim=muon"])
    assert cfg.model.name == f"llama_marin_{size}" and cfg.model.n_layer == 32 and cfg.model.tie_head is False
    assert (cfg.optim.lr, cfg.optim.matrix.momentum, cfg.grad_clip) == (lr, momentum, clip)
    assert cfg.optim.aux.lr == pytest.approx(lr * multiplier) and cfg.optim.aux.betas == [0.8, 0.98]
    assert cfg.data.batch_tokens == seqs * 4096 and make_plan(cfg, 1).total_steps == steps


@pytest.mark.parametrize("size,seqs,iterations,clip", [("210m", 256, 128_000, 0.5), ("720m", 1984, 48_000, 0.1)])
def test_suite_a_settings(size, seqs, iterations, clip):
    """Suite_A/scripts/{size}/*.sh: --sequence_length 512, batch_size x acc_steps, --iterations, --grad_clip, tied embeddings."""
    cfg = compose([f"experiment=vam_suite_a_{size}", "optim=muon_nsr"])
    assert (cfg.data.seq_len, cfg.data.batch_tokens, cfg.grad_clip, cfg.optim.lr) == (512, seqs * 512, clip, 1e-3)
    assert cfg.optim.matrix.gamma == 1000.0 and make_plan(cfg, 8).total_steps == iterations
    assert cfg.model.tie_head is True and cfg.model.rope_layout == "interleaved" and cfg.data.name == "fineweb"


@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1b"])
def test_galore_recipe_as_torchrun_main_runs_it(size):
    """jiaweizzhao/GaLore torchrun_main.py: --grad_clipping 0.0 (off) and torch.optim.Adam's betas (0.9, 0.999)."""
    for optim in [o for e, o in TUNED if e == f"muon2_llama_{size}_c4"]:
        cfg = compose([f"experiment=muon2_llama_{size}_c4", f"optim={optim}"])
        assert cfg.grad_clip is None and cfg.optim.aux.betas == [0.9, 0.999] and cfg.optim.weight_decay == 0.0


def test_muon2_on_a_gpt_model_and_the_reshuffled_ablation():
    gpt = compose(["experiment=muon2_gpt2_small_owt", "optim=muon2"])
    assert gpt.model.family == "gpt2" and gpt.optim.matrix.orthogonalizer.steps == 3
    reshuffled = compose(["experiment=vam_gpt2_small_owt", "optim=muon_nsr_reshuffled"])
    assert reshuffled.optim.matrix.reshuffled is True and reshuffled.optim.matrix.gamma == 10.0


def test_an_untuned_optimizer_inside_an_experiment_is_an_error_naming_the_tuned_ones():
    cfg = compose(["experiment=mars_m_gpt2_small_owt", "optim=muon2"])
    with pytest.raises(ConfigError, match=r"experiment=mars_m_gpt2_small_owt has no tuning for optim=muon2: its lr would be "
                                          r"the CPU default run's optim.lr=0.012.*Tuned here: adamw, mars_m, mars_m_exact, muon"):
        make_plan(cfg, world_size=8)
    allowed = compose(["experiment=mars_m_gpt2_small_owt", "optim=muon2", "allow_untuned=true"])
    make_plan(allowed, world_size=8)
    assert any("runs optim=muon2 untuned (allow_untuned=true): optim.lr=0.012" in w for w in setting_warnings(allowed))
