"""data.packing=false, GaLore's and Suite B's protocol: one document per sequence, truncated to data.seq_len
with its boundary tokens kept, padded; the pads are no targets (loss, validation count, bits per byte)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import tokenizer_files
from configs import compose
from data import DataError, TrainBatches, open_dataset, validation_windows
from data.tokenizer import load_tokenizer
from models.loss import IGNORE, chunked_cross_entropy
from test_hf_data import write_c4
from trainer.errors import ConfigError
from trainer.evaluation import loss_sum, target_count

SEQ = 32


@pytest.fixture(scope="module")
def t5_c4(tmp_path_factory):
    root = tmp_path_factory.mktemp("unpacked")
    docs = write_c4(root / "c4", docs_per_file=120)
    model = tokenizer_files.t5_model(root)
    overrides = ["data=c4", f"data.data_files={root / 'c4'}", f"paths.cache_dir={root / 'cache'}", "data.num_proc=1",
                 "tokenizer=t5", f"tokenizer.path={model}", "data.packing=false", f"data.seq_len={SEQ}"]
    cfg = compose(overrides)
    return overrides, OmegaConf.to_container(cfg.data, resolve=True), docs, load_tokenizer(OmegaConf.to_container(cfg.tokenizer, resolve=True))


def test_each_document_is_one_row_truncated_with_its_eos_kept_and_padded(t5_c4):
    _, data_cfg, docs, tok = t5_c4
    tokens = open_dataset(data_cfg)
    val = tokens.splits["val"]
    assert len(val) == len(docs["val"]) * (SEQ + 1)
    rows = val.window(0, len(val)).reshape(-1, SEQ + 1)
    for row, text in zip(rows, docs["val"]):
        ids = tok.encode_batch([text])[0]
        kept = ids[:SEQ - 1] + [tok.eos_id]  # </s> survives the truncation (GaLore's truncation=True keeps it)
        assert row[:len(kept)].tolist() == kept and (row[len(kept):] == tok.pad_id).all() and row[-1] == tok.pad_id
    assert tokens.meta["packing"] == {"packed": False, "row_len": SEQ + 1}
    packed = open_dataset({**data_cfg, "packing": True})
    assert packed.directory != tokens.directory and len(packed.splits["val"]) != len(val)


def test_training_sequences_are_whole_rows_and_cover_each_document_once_per_epoch(t5_c4):
    _, data_cfg, docs, tok = t5_c4
    train = open_dataset(data_cfg).splits["train"]
    n_rows = len(train) // (SEQ + 1)
    batches = TrainBatches(train, SEQ, seqs_per_step=n_rows, micro_batch=n_rows, seed=0, packed=False)
    (inputs, targets), = batches.step_batches(0)
    rows = train.window(0, len(train)).reshape(-1, SEQ + 1)
    seen = sorted(map(tuple, torch.cat([inputs, targets[:, -1:]], dim=1).tolist()))
    assert seen == sorted(map(tuple, rows.tolist()))  # every document exactly once, none cut across rows


def test_pads_are_no_targets_in_the_loss_and_the_validation_mean(t5_c4):
    _, data_cfg, _, tok = t5_c4
    windows = validation_windows(open_dataset(data_cfg).splits["val"], SEQ, 10 * (SEQ + 1), packed=False)
    assert windows.shape == (10, SEQ + 1)
    head = torch.nn.Linear(8, 512, bias=False)
    hidden = torch.randn(10, SEQ, 8, generator=torch.Generator().manual_seed(0))
    targets = windows[:, 1:].masked_fill(windows[:, 1:] == tok.pad_id, IGNORE)
    real = targets != IGNORE
    by_hand = torch.nn.functional.cross_entropy(head(hidden[real]), targets[real])
    assert torch.allclose(chunked_cross_entropy(hidden, head, targets), by_hand)
    # the validation mean weights each forward by its real targets: a "loss" that is the mean real target id
    # averages to the mean over all real targets, however they fall into forwards of 3 windows
    mean_id = lambda x, y: y[y != tok.pad_id].double().mean()  # noqa: E731
    total, count = loss_sum(mean_id, windows, 3, torch.device("cpu"), pad_id=tok.pad_id)
    assert count == target_count(windows, tok.pad_id) == int(real.sum())
    assert torch.allclose(total / count, windows[:, 1:][real].double().mean())


def test_a_run_on_unpacked_documents_learns_and_reports_bits_per_byte(t5_c4, tmp_path):
    from conftest import TINY, run_cli
    from trainer.metrics import read_metrics

    overrides, *_ = t5_c4
    tiny = [o for o in TINY if not o.startswith(("data.seq_len", "model="))]
    result = run_cli("train.py", *tiny, *overrides, "model=llama_tiny", "model.vocab_size=512", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    every = read_metrics(tmp_path / "run" / "metrics.csv")
    rows = [r for r in every if "val_loss" in r]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and 0 < rows[-1]["val_bpb"] < rows[0]["val_bpb"]
    # the budget counts non-pad targets (budget.counts=nonpad): the tokens column is the targets trained, as the
    # step summary counted them, up to the last step within budget.tokens; throughput counts every position
    budget = json.loads((tmp_path / "run" / "budget.json").read_text())
    assert [r["tokens"] for r in every] == [r["nonpad_tokens"] for r in every]
    assert budget == {"counts": "nonpad", "tokens": every[-1]["tokens"], "steps": every[-1]["step"]}
    assert 2560 - 128 < every[-1]["tokens"] <= 2560 and every[-1]["step"] > 2560 // 128  # more steps: a step has pads
    assert all(b["nonpad_tokens"] > a["nonpad_tokens"] for a, b in zip(every, every[1:]))


def test_a_nonpad_budget_ends_at_the_last_step_whose_targets_fit(t5_c4):
    from trainer.plan import make_plan

    overrides, data_cfg, _, tok = t5_c4
    train = open_dataset(data_cfg).splits["train"]
    small = [*overrides, "model=llama_tiny", "model.vocab_size=512", "data.micro_batch=2", "data.batch_tokens=128",
             "budget.tokens=2000"]
    plan = make_plan(compose(small), 1).on_data(train)
    batches = TrainBatches(train, SEQ, plan.seqs_per_step, plan.micro_batch, seed=plan.data_seed, packed=False)
    by_hand = [0]
    while by_hand[-1] <= 2000:  # every step's targets that are not pads, read from its batches
        by_hand.append(by_hand[-1] + sum(int((t != tok.pad_id).sum()) for _, t in batches.step_batches(len(by_hand) - 1)))
    assert plan.total_steps == len(by_hand) - 2 and plan.budget_tokens == by_hand[-2]
    assert [plan.tokens_at(k) for k in range(plan.total_steps + 1)] == by_hand[:-1]
    assert plan.positions_at(plan.total_steps) == 128 * plan.total_steps
    assert plan.lr_factor(plan.total_steps - 1) == plan.schedule.factor(by_hand[-2], by_hand[-2])

    positions = make_plan(compose([*small, "budget.counts=positions"]), 1).on_data(train)
    assert positions.total_steps == 2000 // 128 and positions.budget_tokens == 2000 // 128 * 128
    with pytest.raises(ConfigError, match=r"budget.tokens=50 non-pad tokens is smaller than the first optimizer step's \d+"):
        make_plan(compose([*small, "budget.tokens=50"]), 1).on_data(train)
    with pytest.raises(ConfigError, match=r"budget.counts='targets' is not one of \['nonpad', 'positions'\]"):
        make_plan(compose([*small, "budget.counts=targets"]), 1)


def test_unpacked_needs_documents_and_a_pad(tmp_path):
    from trainer.plan import make_plan
    from trainer.errors import ConfigError

    with pytest.raises(DataError, match="data.packing=false pads each document to data.seq_len, but data=shakespeare is one document"):
        open_dataset(OmegaConf.to_container(compose(["data.packing=false", f"paths.cache_dir={tmp_path}"]).data, resolve=True))
    with pytest.raises(ConfigError, match="data.packing=false pads every document: tokenizer=gpt2 has no pad token"):
        make_plan(compose(["data.packing=false"]), 1)
