"""scripts/speedup_table.py on synthetic metrics.csv sets with known answers, and on a real multirun."""

import math
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TINY, load_script, run_cli

table = load_script("speedup_table")


def fake_run(root, name, optim, evals, budget=None, batch=100, data="shakespeare", lr=0.01, tokens_per_s=1000.0,
             tokenizer=None, bits_per_nat=None):
    """A run dir: evals = [(tokens, val_loss)], one metrics row per step of `batch` tokens; with
    `bits_per_nat`, a val_bpb column = val_loss x bits_per_nat."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    budget = budget or evals[-1][0]
    choices = {"optim": optim, "model": "gpt2_tiny", "data": data, **({"tokenizer": tokenizer} if tokenizer else {})}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"budget": {"tokens": budget}, "data": {"batch_tokens": batch}, "optim": {"lr": lr}}))
    val = dict(evals)
    lines = ["tokens,step,train_loss,val_loss,val_bpb,grad_evals,tokens_per_s,elapsed_s"]
    for step in range(1, budget // batch + 1):
        tokens = step * batch
        bpb = val[tokens] * bits_per_nat if bits_per_nat and tokens in val else ""
        lines.append(f"{tokens},{step},9.0,{val.get(tokens, '')},{bpb},{step},{tokens_per_s},{step / 10}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    return run


def curve(final, slope=1.0, tokens=(200, 400, 600, 800, 1000)):
    """A decreasing curve ending at `final`: loss = final + slope * (1000 - t) / 1000."""
    return [(t, final + slope * (1000 - t) / 1000) for t in tokens]


def test_bits_per_byte_put_runs_of_two_tokenizers_in_one_table(tmp_path):
    """Per token, a T5 run is its own group (its nats are not GPT-2's); in bits per byte the two compare:
    muon on GPT-2 BPE (0.5 bits per nat) ends at 2.0 bpb, muon2 on T5 (0.4 bits per nat) reaches 2.0 bpb
    where its loss is 5.0, at t = 500 of 1000."""
    fake_run(tmp_path, "gpt2", "muon", curve(4.0), bits_per_nat=0.5)
    fake_run(tmp_path, "t5", "muon2", curve(4.5, tokens=(200, 400, 500, 600, 800, 1000)), tokenizer="t5", bits_per_nat=0.4)
    per_token = run_cli("scripts/speedup_table.py", str(tmp_path), "--baseline", "muon", "--out", str(tmp_path / "a"))
    assert per_token.returncode == 2 and "no finished run of the baseline optim=muon" in per_token.stderr
    result = run_cli("scripts/speedup_table.py", str(tmp_path), "--baseline", "muon", "--metric", "val_bpb",
                     "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "**gpt2_tiny on shakespeare**, target val bpb 2.0000 (baseline muon)" in result.stdout
    rows = {line.split("|")[1].strip(): line for line in rows_of(result.stdout)}
    assert "| muon2 | 1,000 | 1 | 1.8000 ± 0.0000 | 500 | 2.00x |" in rows["muon2"]


def test_a_run_counting_nonpad_targets_ends_at_its_recorded_steps_in_the_arm_of_its_nominal_budget(tmp_path):
    """An unpacked run whose budget counts non-pad targets learns its steps from its data (budget.json): its seeds
    differ in steps and tokens trained, so its arm is budget.tokens as given; a run without the file (positions,
    or written before it) has budget.tokens rounded down to whole steps of data.batch_tokens."""
    nonpad = fake_run(tmp_path, "nonpad", "muon", curve(4.0), budget=1050)
    (nonpad / "budget.json").write_text('{"counts": "nonpad", "tokens": 1000, "steps": 10}')
    longer = fake_run(tmp_path, "longer", "muon", curve(4.0), budget=1050)
    (longer / "budget.json").write_text('{"counts": "nonpad", "tokens": 1190, "steps": 12}')
    fake_run(tmp_path, "positions", "muon", curve(4.0), budget=1050)
    runs = {r.path.name: r for r in table.find_runs([tmp_path])}
    assert (runs["nonpad"].finished, runs["nonpad"].budget) == (True, 1050)
    assert (runs["longer"].finished, runs["longer"].total_steps) == (False, 12)  # its metrics stop at step 10
    assert (runs["positions"].finished, runs["positions"].budget) == (True, 1000)


def test_crossing_interpolates_between_evaluations_and_never_extrapolates():
    evals = [(100, 5.0), (200, 4.0), (300, 3.5)]
    assert table.crossing(evals, 4.5) == pytest.approx(150.0)
    assert table.crossing(evals, 4.0) == pytest.approx(200.0)
    assert table.crossing(evals, 6.0) == 100.0
    assert table.crossing(evals, 3.4) is None


def test_student_t():
    assert table.t_cdf(2.015048, 5) == pytest.approx(0.95, abs=1e-6)
    assert table.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert table.t_cdf(0.0, 7) == pytest.approx(0.5)


def test_power_law_fit_recovers_known_parameters():
    alpha, B, beta = 40.0, 0.3, 2.5
    budgets = [1e5, 2e5, 4e5, 8e5, 1.6e6]
    fitted = table.fit_power_law(budgets, [alpha * d**-B + beta for d in budgets])
    assert fitted == pytest.approx((alpha, B, beta), rel=1e-4)


def rows_of(stdout):
    return [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_speedups_seeds_and_a_target_never_reached(tmp_path):
    for seed, final in enumerate((4.00, 4.02, 3.98)):
        fake_run(tmp_path, f"muon{seed}", "muon", curve(final))
    for seed, shift in enumerate((0.0, 0.01, -0.01)):  # reaches 4.0 at t = 500 (+/- 10 per 0.01)
        fake_run(tmp_path, f"fast{seed}", "muon2", curve(3.5 + shift))
    fake_run(tmp_path, "slow", "adamw", curve(4.5))
    result = run_cli("scripts/speedup_table.py", str(tmp_path), "--baseline", "muon", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "target val loss 4.0000 (baseline muon)" in result.stdout
    rows = {line.split("|")[1].strip(): line for line in rows_of(result.stdout)}
    # muon2: mean curve 3.5 + (1000-t)/1000 = 4.0 at t = 500: 1000/500 = 2x; seeds cross at 490, 500, 510
    speedups = [1000 / 510, 1000 / 500, 1000 / 490]
    mean, low, high = table.mean_interval(speedups)
    assert f"| 500 | 2.00x ({low:.2f}-{high:.2f}) |" in rows["muon2"]
    assert "| muon2 | 1,000 | 3 | 3.5000 ± 0.0100 |" in rows["muon2"]
    assert "| 1,000 | 1.00x (seeds reaching: 2/3) |" in rows["muon"]
    assert "not reached" in rows["adamw"] and "| - |" in rows["adamw"]
    p = float(rows["muon2"].split("|")[7])
    assert p < 1e-3  # 3.5 ± 0.01 against 4.0
    assert (tmp_path / "out.md").read_text().strip() == result.stdout.strip()
    assert (tmp_path / "out.csv").read_text().splitlines()[0].startswith("model,data,optim,budget,n,final_loss")
    assert (tmp_path / "out.png").stat().st_size > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # each output written whole through data/files.py


def test_d_eff_over_baseline_budgets(tmp_path):
    alpha, B, beta = 30.0, 0.5, 3.0
    loss = lambda d: alpha * d**-B + beta  # noqa: E731
    for budget in (1000, 2000, 4000):
        fake_run(tmp_path, f"muon_{budget}", "muon", [(budget // 2, loss(budget) + 0.1), (budget, loss(budget))])
    # an optimizer whose 1000-token loss equals the baseline's at 2000 tokens: D_eff/D = 2
    fake_run(tmp_path, "better", "muon2", [(500, loss(2000) + 0.1), (1000, loss(2000))])
    result = run_cli("scripts/speedup_table.py", str(tmp_path), "--out", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    better = next(r for r in rows_of(result.stdout) if r.startswith("| muon2 |"))
    assert float(better.split("|")[8]) == pytest.approx(2.0, abs=0.01)


def test_unfinished_runs_are_listed_and_left_out(tmp_path):
    fake_run(tmp_path, "done", "muon", curve(4.0))
    broken = fake_run(tmp_path, "killed", "muon", curve(4.0))
    lines = (broken / "metrics.csv").read_text().splitlines()
    (broken / "metrics.csv").write_text("\n".join(lines[:5]) + "\n")
    result = run_cli("scripts/speedup_table.py", str(tmp_path), "--out", str(tmp_path / "t"))
    assert result.returncode == 0
    assert f"- {broken}: step 4 of 10" in result.stdout
    assert rows_of(result.stdout)[0].startswith("| muon | 1,000 | 1 |")


@pytest.mark.parametrize("setup,args,message", [
    (lambda root: None, [], "no run dirs (metrics.csv + .hydra/) under"),
    (lambda root: fake_run(root, "a", "adamw", curve(4.0)), ["--baseline", "muon"],
     "no finished run of the baseline optim=muon in this group (optimizers present: ['adamw']); pick one with --baseline"),
    (lambda root: (fake_run(root, "a", "muon", curve(4.0)), fake_run(root, "b", "muon", curve(4.0), data="c4")), ["--target", "4.1"],
     "--target is one loss, but the runs hold 2 model/data groups (gpt2_tiny on shakespeare, gpt2_tiny on c4): pass the directories of one group"),
    (lambda root: (root / fake_run(root, "a", "muon", curve(4.0)) / "metrics.csv").write_text("tokens,step,val_loss\n100,1,9.0\n"), [],
     "none of the 1 run(s) under"),
])
def test_bad_input_messages(tmp_path, setup, args, message):
    setup(tmp_path)
    result = run_cli("scripts/speedup_table.py", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


# Which heavy modules importing the script, then running it, leaves loaded.
IMPORTS = """
import runpy, sys
table = runpy.run_path("scripts/speedup_table.py")
heavy = lambda: " ".join(sorted({"torch", "tiktoken", "numpy", "matplotlib"} & set(sys.modules)))
print("imported:", heavy())
table["main"]([sys.argv[1], "--out", sys.argv[2]])
print("ran:", heavy())
"""


def test_reading_metrics_needs_no_torch_or_tiktoken_and_plotting_loads_matplotlib_only_when_it_runs(tmp_path):
    fake_run(tmp_path, "a", "muon", curve(4.0))
    result = subprocess.run([sys.executable, "-c", IMPORTS, str(tmp_path), str(tmp_path / "t")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "imported: \n" in result.stdout and "ran: matplotlib numpy\n" in result.stdout


def test_groups_are_reported_separately(tmp_path):
    fake_run(tmp_path, "a", "muon", curve(4.0))
    fake_run(tmp_path, "b", "muon", curve(3.0), data="c4")
    result = run_cli("scripts/speedup_table.py", str(tmp_path), "--out", str(tmp_path / "t"))
    assert "**gpt2_tiny on shakespeare**, target val loss 4.0000" in result.stdout
    assert "**gpt2_tiny on c4**, target val loss 3.0000" in result.stdout


def test_on_a_real_multirun(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    result = run_cli("train.py", "-m", *TINY, "budget.tokens=1280", "optim=adamw,muon", f"paths.cache_dir={cache_dir}",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_cli("scripts/speedup_table.py", str(sweep), "--baseline", "muon")
    assert result.returncode == 0, result.stderr
    from trainer.metrics import read_metrics

    final = {optim: read_metrics(sweep / job / "metrics.csv")[-1]["val_loss"] for job, optim in (("0", "adamw"), ("1", "muon"))}
    rows = {line.split("|")[1].strip(): line for line in rows_of(result.stdout)}
    assert f"| muon | 1,280 | 1 | {final['muon']:.4f} ± 0.0000 | 1,280 | 1.00x |" in rows["muon"]
    assert f"| adamw | 1,280 | 1 | {final['adamw']:.4f} ± 0.0000 |" in rows["adamw"]
    assert (sweep / "speedup_table.png").is_file() and not math.isnan(final["adamw"])
