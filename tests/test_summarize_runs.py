import yaml

from conftest import run_cli


def fake_run(root, name, optim, losses, elapsed, finished=True, tokens_per_s=1000.0):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"optim": optim, "model": "gpt2_tiny"}}}}))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"budget": {"tokens": 300}, "data": {"batch_tokens": 100}, "optim": {"lr": 0.01}}))
    steps = len(losses) if finished else len(losses) - 1
    lines = ["tokens,step,train_loss,val_loss,grad_evals,tokens_per_s,elapsed_s"]
    for s in range(1, steps + 1):
        lines.append(f"{100 * s},{s},{losses[s - 1] + 0.1},{losses[s - 1] if s == steps else ''},{s},{tokens_per_s},{elapsed * s / steps}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_table_of_a_multirun(tmp_path):
    fake_run(tmp_path, "0", "adamw", [5.0, 4.8, 4.7], elapsed=30.0, tokens_per_s=2000.0)
    fake_run(tmp_path, "1", "muon", [4.9, 4.5, 4.2], elapsed=60.0)
    fake_run(tmp_path, "2", "muon2", [4.9, 4.6, 4.4], elapsed=45.0, finished=False)
    result = run_cli("scripts/summarize_runs.py", str(tmp_path), "--baseline", "muon")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| muon | 0.01 | 4.2000 | 300 | 3 | 3 | 60 s | 1,000 | 1.00x |")
    assert rows[1].startswith("| adamw | 0.01 | 4.7000 | 300 | 3 | 3 | 30 s | 2,000 | 0.50x |")
    assert rows[2].startswith("| muon2 | 0.01 | unfinished | 200 | 2 |")


def test_empty_directory_is_a_clear_error(tmp_path):
    result = run_cli("scripts/summarize_runs.py", str(tmp_path))
    assert result.returncode == 2 and f"no run dirs (metrics.csv + .hydra/) under {tmp_path}" in result.stderr
