"""Evaluate a trained model without training: validation loss, perplexity and bits per byte on any data
config, and downstream tasks with lm-evaluation-harness on the model's Hugging Face export.

    python scripts/evaluate.py runs/<run dir>                                   # the run's own validation set
    python scripts/evaluate.py runs/<run dir> data=c4 data.data_files=<dir> eval.tokens=10485760
    python scripts/evaluate.py path/to/last.ckpt --tasks hellaswag,arc_easy,piqa [--limit 200]

The model, its tokenizer and its data config are the checkpoint's; overrides change them as in
train.py (`data=<name>` takes that data config, `tokenizer=<name>` that tokenizer, `key=value` any entry).
Writes <run dir>/eval/<data name>.json ({val_loss, val_ppl, val_bpb, tokens, ...}), and with --tasks
exports the model to <run dir>/eval/hf/ (scripts/export_hf.py) and writes lm-eval's results to
<run dir>/eval/lm_eval.json. --tasks needs the eval extra: `pip install -e .[eval]`; `--include` adds a
folder of task YAMLs (local tasks, offline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from configs import compose
from data import DataError, open_dataset, validation_windows
from data.files import atomic_file
from data.tokenizer import TokenizerError, write_tokenizer_files
from models.hf_export import ExportError, export_model, load_model
from models.loss import without_pads
from trainer.evaluation import loss_sum, target_bytes, target_count, validation_metrics
from trainer.plan import tokenizer_of

GROUPS = ("data", "tokenizer")  # overrides that pick a config file of their group rather than set a value


def evaluation_config(saved: dict, overrides: list[str]):
    """The checkpoint's resolved config with `overrides` applied: a group choice replaces its node by that
    config file's (its interpolations resolved against this config), `key=value` sets one entry."""
    cfg = OmegaConf.create(saved)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not key=value")
        if key in GROUPS:
            cfg[key] = OmegaConf.to_container(compose([override])[key], resolve=False)
            if key == "data":
                cfg.data.tokenizer = "${tokenizer}"
        else:
            OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    if any(o.startswith("tokenizer") for o in overrides) and not any(o.startswith("data.eot=") for o in overrides):
        cfg.data.eot = "${tokenizer.eot}"  # the new tokenizer's boundary tokens, unless set
    cfg.data.tokenizer = "${tokenizer}"
    return cfg


def validation(model: torch.nn.Module, cfg, device: torch.device) -> dict:
    tokenizer = tokenizer_of(cfg)
    tokens = open_dataset(OmegaConf.to_container(cfg.data, resolve=True))
    seq_len, packed = int(cfg.data.seq_len), bool(cfg.data.get("packing", True))
    pad_id = None if packed else tokenizer.pad_id
    windows = validation_windows(tokens.splits["val"], seq_len, int(cfg.eval.tokens), packed)
    micro_batch = max(1, int(cfg.eval.get("batch_tokens") or int(cfg.data.micro_batch) * seq_len) // seq_len)
    loss = lambda x, y: model(x, without_pads(y, pad_id))  # noqa: E731
    total, count = loss_sum(loss, windows, micro_batch, device, pad_id=pad_id)
    metrics = validation_metrics(float(total / count), windows, target_bytes(windows, tokenizer.piece_bytes()), pad_id)
    return {**metrics, "tokens": target_count(windows, pad_id), "data": cfg.data.name, "tokenizer": tokenizer.name,
            "seq_len": seq_len, "packing": packed}


def lm_eval_tasks(config: dict, state_dict: dict, out_dir: Path, tasks: list[str], include: Path | None,
                  limit: int | None, device: torch.device) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--tasks runs lm-evaluation-harness, which is not installed: pip install -e .[eval]") from None
    hf_dir = export_model(config["model"], state_dict, out_dir / "hf")
    write_tokenizer_files(config.get("tokenizer"), hf_dir)
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; `lm-eval ls tasks` lists them (a local one: --include <dir>)")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=tasks,
                                      task_manager=manager, limit=limit, device=str(device), batch_size=8)
    return {"results": results["results"], "versions": results.get("versions", {}), "n-samples": results.get("n-samples", {})}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory (its checkpoints/last.ckpt) or a .ckpt file")
    parser.add_argument("overrides", nargs="*", help="config overrides: data=<name>, tokenizer=<name>, eval.tokens=N, ...")
    parser.add_argument("--tasks", help="comma-separated lm-eval tasks (hellaswag,arc_easy,piqa,sciq,...)")
    parser.add_argument("--include", type=Path, help="a folder of lm-eval task YAMLs (local tasks)")
    parser.add_argument("--limit", type=int, help="lm-eval: at most this many examples per task")
    parser.add_argument("--out", type=Path, help="where to write (default: <run dir>/eval)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        config, model = load_model(args.checkpoint)
        run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent.parent
        out_dir = args.out or run_dir / "eval"
        cfg = evaluation_config(config, args.overrides)
        model.to(device)
        metrics = validation(model, cfg, device)
        print(f"{cfg.data.name} ({metrics['tokens']:,} tokens, tokenizer {metrics['tokenizer']}): val_loss "
              f"{metrics['val_loss']:.4f}  val_ppl {metrics['val_ppl']:.2f}  val_bpb {metrics.get('val_bpb', float('nan')):.4f}")
        write_json(out_dir / f"{cfg.data.name}.json", metrics)
        if args.tasks:
            results = lm_eval_tasks(config, model.state_dict(), out_dir, args.tasks.split(","), args.include, args.limit, device)
            write_json(out_dir / "lm_eval.json", results)
            for task, values in results["results"].items():
                print(f"{task}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float)))
    except (ExportError, DataError, TokenizerError, ValueError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
