"""End-to-end runs of a tiny GPT-2 in-process: eval cadence, metrics.csv, resume, failures."""

import copy
import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from trainer.checkpoint import last_checkpoint_path, read_checkpoint_meta
from conftest import ROOT
from trainer.errors import CheckpointError, NonFiniteLossError
from trainer.metrics import read_metrics
from trainer.run import run


class CrashAt(L.Callback):
    """Simulates a killed job: raises once optimizer step `step` is done (its row written)."""

    class Crash(Exception):
        pass

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise CrashAt.Crash(self.step)


class PoisonWeightsAt(L.Callback):
    """Sets one weight to NaN before the first micro-batch of step `step`."""

    def __init__(self, step):
        self.step, self.done = step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1 and not self.done:
            with torch.no_grad():
                pl_module.model.blocks[0].mlp.fc.weight[0, 0] = float("nan")
            self.done = True


def rows(run_dir):
    return read_metrics(run_dir / "metrics.csv")


def test_tokens_eval_rows_and_schedule(make_cfg, tmp_path):
    cfg = make_cfg("eval.every_tokens=300")
    result = run(cfg)
    table = rows(tmp_path / "run")
    assert [r["step"] for r in table] == list(range(1, 21))
    assert [r["tokens"] for r in table] == [128 * s for s in range(1, 21)]
    assert [r["tokens"] for r in table if "val_loss" in r] == [384, 640, 1024, 1280, 1536, 1920, 2176, 2432, 2560]
    assert result.val_loss == table[-1]["val_loss"] and result.tokens == 2560
    columns = {"lr_matrix", "lr_embedding", "lr_vector", "grad_norm", "tokens_per_s", "elapsed_s", "train_loss"}
    assert columns <= set(table[0])
    # the lr of step s is the schedule at the tokens seen at its end, for every group
    peak, warmup, r = cfg.optim.lr, 0.05 * 2560, 0.1
    for row in table:
        tau = row["tokens"]
        factor = tau / warmup if tau <= warmup else r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (tau - warmup) / (2560 - warmup)))
        assert row["lr_matrix"] == pytest.approx(peak * factor) == row["lr_embedding"] == row["lr_vector"]
    assert table[-1]["val_loss"] < table[0]["train_loss"] - 1.0  # it learns
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_interrupted_and_resumed_run_equals_uninterrupted(make_cfg, tmp_path):
    straight = run(make_cfg(run_dir=tmp_path / "straight"))
    with pytest.raises(CrashAt.Crash):
        run(make_cfg(run_dir=tmp_path / "resumed"), callbacks=[CrashAt(12)])
    assert [r["step"] for r in rows(tmp_path / "resumed")][-1] == 12
    assert read_checkpoint_meta(last_checkpoint_path(tmp_path / "resumed"))["step"] == 10  # every 640 tokens = 5 steps
    resumed = run(make_cfg(run_dir=tmp_path / "resumed"))
    assert resumed.resumed_from_step == 10
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 21))  # rows 11-12 of the crashed session were replaced
    for ra, rb in zip(a, b):
        for key in ("tokens", "train_loss", "val_loss", "lr_matrix", "lr_embedding", "grad_norm"):
            assert (key in ra) == (key in rb)
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-6, (ra["step"], key)
    assert abs(straight.val_loss - resumed.val_loss) <= 1e-6


def test_rerunning_a_finished_run_changes_nothing(make_cfg, tmp_path):
    first = run(make_cfg())
    before = (tmp_path / "run" / "metrics.csv").read_text()
    again = run(make_cfg())
    assert again.resumed_from_step == 20 and again.val_loss == first.val_loss
    assert (tmp_path / "run" / "metrics.csv").read_text() == before


def test_gradient_accumulation_matches_one_big_micro_batch(make_cfg, tmp_path):
    accumulated = run(make_cfg("data.micro_batch=2", run_dir=tmp_path / "a"))  # 2 micro-batches per step
    single = run(make_cfg("data.micro_batch=4", run_dir=tmp_path / "b"))
    for ra, rb in zip(rows(tmp_path / "a"), rows(tmp_path / "b")):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
    assert accumulated.val_loss == pytest.approx(single.val_loss, rel=1e-4)


OPTIMIZERS = sorted(p.stem for p in (ROOT / "configs" / "optim").glob("*.yaml"))
RESUME_REPRESENTATIVES = ["adamw", "dion", "mars_m_exact", "muon", "muon2_f"]


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optimizer_trains(make_cfg, tmp_path, optim):
    """Three steps: finite losses and gradient norms, one per step, and the look-ahead counted."""
    run(make_cfg(f"optim={optim}", "budget.tokens=384", "eval.every_tokens=384"))
    table = rows(tmp_path / "run")
    assert [r["step"] for r in table] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) and 5.0 < r["train_loss"] < 15.0 for r in table)  # ln 50257 = 10.8
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in table)
    assert math.isfinite(table[-1]["val_loss"])
    assert [r["grad_evals"] for r in table] == [s * (2 if optim == "mars_m_exact" else 1) for s in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("optim", RESUME_REPRESENTATIVES)
def test_optimizer_trains_and_resumes_exactly(make_cfg, tmp_path, optim):
    """8 steps straight vs crashed after step 5 and resumed from the checkpoint at step 3."""
    short = [f"optim={optim}", "budget.tokens=1024", "checkpoint.every_tokens=384", "eval.every_tokens=512"]
    straight = run(make_cfg(*short, run_dir=tmp_path / "straight"))
    table = rows(tmp_path / "straight")
    assert table[-1]["val_loss"] < table[0]["train_loss"] - 0.3  # it learns
    with pytest.raises(CrashAt.Crash):
        run(make_cfg(*short, run_dir=tmp_path / "resumed"), callbacks=[CrashAt(5)])
    resumed = run(make_cfg(*short, run_dir=tmp_path / "resumed"))
    assert resumed.resumed_from_step == 3
    for ra, rb in zip(table, rows(tmp_path / "resumed")):
        for key in ("train_loss", "grad_norm", "val_loss"):
            assert abs(ra.get(key, 0.0) - rb.get(key, 0.0)) <= 1e-6, (ra["step"], key)
    assert straight.val_loss == pytest.approx(resumed.val_loss, abs=1e-6)
    assert table[-1]["grad_evals"] == (16 if optim == "mars_m_exact" else 8)


class Snapshot(L.Callback):
    """The weights before step `step` and, at the end of training, the optimizer's state."""

    def __init__(self, step):
        self.step, self.weights, self.state = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.weights is None:
            self.weights = copy.deepcopy(pl_module.model.state_dict())

    def on_train_end(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.model.named_parameters()}
        optimizer = trainer.optimizers[0]
        self.state = {names[id(p)]: {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.parts["matrix"].param_groups[0]["params"]}
        self.batches = pl_module.train_batches


def test_exact_mars_m_second_gradient_is_the_previous_weights_on_the_current_batch(make_cfg):
    """After step g+1 the correction for step g+2 is ∇f(X_g, ξ_{g+1}): recompute it with autograd."""
    snapshot = Snapshot(step=3)
    run(make_cfg("optim=mars_m_exact", "budget.tokens=512", "grad_clip=null"), callbacks=[snapshot])  # steps 0..3
    from models import build_model
    from omegaconf import OmegaConf

    model = build_model(OmegaConf.to_container(make_cfg().model)).double()
    model.load_state_dict(snapshot.weights)
    micro_batches = snapshot.batches.step_batches(4)
    for inputs, targets in micro_batches:
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        (loss / len(micro_batches)).backward()
    for name, p in model.named_parameters():
        if name in snapshot.state:
            stored = snapshot.state[name]["mars/last_grad"].double()
            assert (stored - p.grad).norm() / p.grad.norm() < 1e-5, name  # fp32 training vs fp64 recomputation


def test_the_optimizer_decides_the_two_pass_step(make_cfg, tmp_path):
    from trainer.plan import make_plan

    exact, approximate = make_plan(make_cfg("optim=mars_m_exact"), 1), make_plan(make_cfg("optim=mars_m"), 1)
    assert (exact.lookahead, exact.gradient_evals_per_step) == (True, 2)
    assert (approximate.lookahead, approximate.gradient_evals_per_step) == (False, 1)
    assert make_plan(make_cfg("optim=mars_m", "optim.matrix.exact=true"), 1).lookahead
    run(make_cfg("optim=mars_m_exact", "budget.tokens=512"))  # 4 steps of 2 micro-batches
    assert [(r["step"], r["grad_evals"]) for r in rows(tmp_path / "run")] == [(s, 2 * s) for s in range(1, 5)]


def test_llama_trains(make_cfg):
    result = run(make_cfg("model=llama_tiny", "optim.lr=1e-2", "budget.tokens=1280"))
    assert rows(result.run_dir)[-1]["val_loss"] < rows(result.run_dir)[0]["train_loss"] - 0.5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path):
    with pytest.raises(NonFiniteLossError) as error:
        run(make_cfg(), callbacks=[PoisonWeightsAt(8)])
    checkpoint = last_checkpoint_path(tmp_path / "run")
    assert "train loss is nan at step 8 (1,024 tokens); stopped before the update" in str(error.value)
    assert f"The last good checkpoint is {checkpoint} (step 5)" in str(error.value)
    assert read_checkpoint_meta(checkpoint)["step"] == 5
    assert rows(tmp_path / "run")[-1]["step"] == 7


def test_a_nan_before_any_checkpoint_says_none_exists_yet(make_cfg, tmp_path):
    with pytest.raises(NonFiniteLossError) as error:
        run(make_cfg(), callbacks=[PoisonWeightsAt(3)])
    assert ("train loss is nan at step 3 (384 tokens); stopped before the update. No checkpoint exists yet (the first was "
            "due after step 5): rerunning starts over.") in str(error.value)
    assert not last_checkpoint_path(tmp_path / "run").exists()


def test_a_finished_run_whose_metrics_csv_was_deleted_gets_it_back_from_its_checkpoint(make_cfg, tmp_path, capsys):
    first = run(make_cfg())
    csv = tmp_path / "run" / "metrics.csv"
    before = csv.read_text()
    csv.unlink()
    again = run(make_cfg())
    assert again.val_loss == first.val_loss and csv.read_text() == before
    assert f"note: {csv} is missing: rewritten from the 20 rows kept in {last_checkpoint_path(tmp_path / 'run')}" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["cut mid-line", "emptied", "rows lost"])
def test_a_metrics_csv_damaged_during_a_crash_is_rewritten_from_the_checkpoint_not_shortened(make_cfg, tmp_path, capsys, damage):
    with pytest.raises(CrashAt.Crash):
        run(make_cfg("budget.tokens=1536"), callbacks=[CrashAt(7)])  # checkpoint at step 5, rows up to 7
    csv = tmp_path / "run" / "metrics.csv"
    text = csv.read_text()
    csv.write_text({"cut mid-line": text[:-25], "emptied": "", "rows lost": "\n".join(text.splitlines()[:3]) + "\n"}[damage])
    run(make_cfg("budget.tokens=1536"))
    out = capsys.readouterr().out
    reason = {"cut mid-line": "is damaged (", "emptied": "is damaged (", "rows lost": "holds 2 of the 5 rows up to step 5"}[damage]
    assert f"note: {csv} {reason}" in out and "rewritten from the 5 rows kept in" in out
    assert [r["step"] for r in rows(tmp_path / "run")] == list(range(1, 13))
    assert csv.read_text().splitlines()[:6] == text.splitlines()[:6]  # the header and rows 1-5 as first written


def test_a_checkpoint_without_metrics_rows_refuses_a_damaged_csv(make_cfg, tmp_path):
    """Checkpoints of format 1 kept no metrics rows: a lost metrics.csv cannot be rebuilt, so it is refused."""
    with pytest.raises(CrashAt.Crash):
        run(make_cfg(), callbacks=[CrashAt(12)])
    checkpoint = last_checkpoint_path(tmp_path / "run")
    saved = torch.load(checkpoint, weights_only=False)
    del saved["muonlab"]["metrics"]
    torch.save(saved, checkpoint)
    (tmp_path / "run" / "metrics.csv").unlink()
    with pytest.raises(CheckpointError, match=r"metrics.csv is missing, and checkpoint .* holds no copy of them. Restore .*, "
                                              r"or pass resume=false to start over"):
        run(make_cfg())


def test_corrupt_checkpoint_is_refused_with_advice(make_cfg, tmp_path):
    with pytest.raises(CrashAt.Crash):
        run(make_cfg(), callbacks=[CrashAt(6)])
    checkpoint = last_checkpoint_path(tmp_path / "run")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"checkpoint {checkpoint} is corrupt or unreadable .*Delete {checkpoint} to start this run over"):
        run(make_cfg())


def test_resuming_with_a_different_config_is_refused(make_cfg, tmp_path):
    with pytest.raises(CrashAt.Crash):
        run(make_cfg(), callbacks=[CrashAt(6)])
    with pytest.raises(CheckpointError, match=r"holds a checkpoint of a different configuration \(optim.aux.lr: 0.012 -> 0.01; optim.lr: 0.012 -> 0.01; optim.matrix.lr: 0.012 -> 0.01\)"):
        run(make_cfg("optim.lr=0.01"))


def test_checkpoints_from_before_budget_counts_resume_as_they_trained():
    """Budgets counted positions before budget.counts: a packed run's are its non-pad targets (it has no pads)
    and resumes under the new default; an unpacked one's differ, and resuming it with budget.counts=nonpad is refused."""
    from trainer.checkpoint import trajectory_differences

    def config(packing, counts=None):
        return {"data": {"packing": packing, "eot": "append"}, "budget": {"tokens": 1000, **({"counts": counts} if counts else {})}}
    assert trajectory_differences(config(True), config(True, "nonpad")) == []
    assert trajectory_differences(config(False), config(False, "nonpad")) == ["budget.counts: 'positions' -> 'nonpad'"]
    assert trajectory_differences(config(False), config(False, "positions")) == []


def test_progress_lines_in_a_log_file(make_cfg, capsys):
    run(make_cfg("callbacks=default", "callbacks.progress.log_every_s=0"))
    out = capsys.readouterr().out
    assert "[128/2.56k tokens, step 1] loss" in out
    assert "[2.56k/2.56k tokens, step 20] loss" in out and "| val " in out and "tok/s" in out
    assert "final val loss" in out and "run dir:" in out
    assert "matrix     Muon" in out  # the routing table


def test_compile_flag_compiles_each_block(make_cfg):
    from models import build_model
    from trainer.module import LanguageModel
    from trainer.plan import make_plan

    cfg = make_cfg("compile=true")
    model = build_model(OmegaConf.to_container(cfg.model))
    module = LanguageModel(make_plan(cfg, 1), model, build_optimizer=None, train_tokens=None, val_windows=torch.zeros(1, 33))
    assert all(block._compiled_call_impl is None for block in module.model.blocks)
    module.configure_model()
    assert all(block._compiled_call_impl is not None for block in module.model.blocks)
    assert module.model._compiled_call_impl is None  # the blocks, not the whole model (torchtitan's way)


def test_mfu_and_peak_memory_are_logged_per_step(make_cfg, tmp_path):
    """mfu = (6 N + 12 L T d) tokens/s / peak with N = hidden matrices + head (trainer/throughput.py): gpt2_tiny has
    98,304 hidden-matrix and 50,257 x 64 head parameters, 2 layers of width 64, here at seq_len 32."""
    run(make_cfg("trainer.peak_flops=1e12"))
    table = rows(tmp_path / "run")
    for row in table:
        assert row["mfu"] == pytest.approx((6 * (98_304 + 50_257 * 64) + 12 * 2 * 32 * 64) * row["tokens_per_s"] / 1e12, rel=1e-9)
        assert row["peak_tflops_config"] == 1.0 and "peak_tflops_measured" not in row
    memory = [row["peak_memory_gb"] for row in table]
    assert memory == sorted(memory) and 0.05 < memory[0] < 24  # a peak never falls; a Python process with torch


def test_activation_checkpointing_changes_memory_not_the_run(make_cfg, tmp_path):
    plain = run(make_cfg(run_dir=tmp_path / "plain"))
    checkpointed = run(make_cfg("activation_checkpointing=true", run_dir=tmp_path / "checkpointed"))
    a, b = rows(tmp_path / "plain"), rows(tmp_path / "checkpointed")
    assert max(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(a, b)) <= 1e-6
    assert abs(plain.val_loss - checkpointed.val_loss) <= 1e-6


def test_activation_checkpointing_recomputes_each_block_in_the_backward(make_cfg):
    from models import build_model

    model = build_model(OmegaConf.to_container(make_cfg().model))
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, 50257, (2, 8))
    model(idx).sum().backward()
    assert len(calls) == 2  # two blocks, one forward each
    model.activation_checkpointing = True
    calls.clear()
    model(idx).sum().backward()
    assert len(calls) == 4  # and again in the backward


@pytest.mark.parametrize("optim", ["muon", "mars_m_exact", "muon_clip"])
def test_a_step_reads_the_device_once(make_cfg, optim):
    """Loss, gradient norm (clipping decided on the device), the stop agreement and QK-clip's logit maxima are
    read together once per optimizer step, whatever the optimizer: exact MARS-M's two passes, QK-clip's
    scaling, two micro-batches per step. (Steps with an evaluation or a checkpoint read more: not counted.)"""
    from host_reads import CountHostReads

    counter = CountHostReads()
    run(make_cfg(f"optim={optim}", "budget.tokens=1024", "data.micro_batch=1", "grad_clip=0.001",
                 "eval.every_tokens=100000", "checkpoint.every_tokens=100000"), callbacks=[counter])
    assert len(counter.steps) == 7  # steps 1-7 of 8 (the last one ends with the final evaluation)
    for reads, places in counter.steps[1:]:  # the first step also builds the optimizer's state
        assert reads == 1, places
