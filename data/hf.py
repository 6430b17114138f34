"""Hugging Face datasets (OpenWebText, C4, FineWeb-Edu): from the hub, or from local files in the hub's layout.

    hub     load_dataset(hf_path, hf_name, revision=...)      C4: allenai/c4 "en", streamed
    local   load_dataset("json" | "parquet", data_files=...)  the files a hub download leaves on disk

`data.data_files` is a file, a glob or a directory; files are assigned to splits by the config's
`split_files` patterns (C4: c4-train.*.json.gz / c4-validation.*.json.gz). A dataset without a
validation split (OpenWebText) holds out a fixed fraction of its documents instead, nanoGPT's rule:
`train_test_split(test_size=0.0005, seed=2357, shuffle=True)`, so every run validates on the same
documents. FineWeb-Edu (no validation split either) validates on the first `val_head_tokens` tokens
of the tokenized train stream and trains on the rest, llm.c's rule (its first 100M-token shard is
"val"); the document crossing the boundary is split. Without network a hub load fails within seconds,
naming the local-files command.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from data.prepare import base_meta, finish, split_head, tokenize, tokenizer_fingerprint, write_split
from data.shards import FORMAT_VERSION, DataError, is_complete
from data.tokenizer import load_tokenizer

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json", ".parquet": "parquet"}


def builder_of(path: str) -> str:
    for suffix, builder in LOCAL_BUILDERS.items():
        if path.endswith(suffix):
            return builder
    raise DataError(f"{path}: not a file type the hub's datasets use here (expected one of {sorted(LOCAL_BUILDERS)})")


def local_split_files(cfg: Mapping) -> dict[str, list[str]]:
    """{split: sorted files} from data.data_files (a file, glob or directory) and data.split_files."""
    spec = str(cfg["data_files"])
    if os.path.isdir(spec):
        files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())
    else:
        files = sorted(glob.glob(spec, recursive=True))
    files = [f for f in files if any(f.endswith(s) for s in LOCAL_BUILDERS)]
    if not files:
        raise DataError(f"data.data_files={spec} matches no data files ({sorted(LOCAL_BUILDERS)}); {cfg['layout']}")
    splits = {split: [f for f in files if fnmatch.fnmatch(os.path.basename(f), pattern)]
              for split, pattern in cfg["split_files"].items()}
    if not splits["train"] or ("val" in splits and not splits["val"]):
        found = ", ".join(os.path.relpath(f, spec) if os.path.isdir(spec) else f for f in files[:4])
        raise DataError(f"data.data_files={spec}: no files match {dict(cfg['split_files'])} (found {found}); {cfg['layout']}")
    return splits


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None if the hub answers within `timeout` seconds, else why not (offline mode included)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as e:
        return f"{endpoint} unreachable: {getattr(e, 'reason', e)}"
    return None


def offline_error(cfg: Mapping, why: str) -> DataError:
    return DataError(
        f"cannot load {cfg['hf_path']} from the Hugging Face hub ({why}). Prepare it from local files in the hub's "
        f"layout instead: python scripts/prepare_data.py data={cfg['name']} data.data_files=<path, glob or directory> "
        f"({cfg['layout']})"
    )


def load_split(cfg: Mapping, split: str, files: list[str] | None, cache_dir: Path):
    """A datasets object for one split: streamed (C4) or a map-style Dataset (for a held-out split)."""
    import datasets

    streaming = bool(cfg["streaming"])
    try:
        if files is not None:
            return datasets.load_dataset(builder_of(files[0]), data_files=files, split="train", streaming=streaming,
                                         cache_dir=str(cache_dir))
        return datasets.load_dataset(cfg["hf_path"], cfg["hf_name"], split=cfg["hf_splits"][split], revision=cfg["hf_revision"],
                                     streaming=streaming, cache_dir=str(cache_dir))
    except (ConnectionError, OSError) as e:
        if files is None:
            raise offline_error(cfg, f"{type(e).__name__}: {e}") from None
        raise DataError(f"cannot read the {split} files ({files[0]}, ...): {e}") from None


def source_description(cfg: Mapping) -> dict:
    if cfg["data_files"]:
        splits = local_split_files(cfg)
        return {"kind": "local", "data_files": str(cfg["data_files"]),
                "files": {split: [{"path": f, "bytes": os.path.getsize(f)} for f in fs] for split, fs in splits.items()}}
    return {"kind": "hub", "path": cfg["hf_path"], "name": cfg["hf_name"], "revision": cfg["hf_revision"],
            "splits": dict(cfg["hf_splits"])}


def hf_dataset_dir(cfg: Mapping) -> Path:
    """<cache_dir>/<name>-<fingerprint of source, split rule, cap, tokenizer and format>."""
    fingerprint = {
        "format": FORMAT_VERSION, **tokenizer_fingerprint(cfg.get("tokenizer")), "source": source_description(cfg), "eot": cfg["eot"],
        "val_fraction": cfg["val_fraction"], "val_seed": cfg["val_seed"], "max_tokens": cfg["max_tokens"],
        "text_field": cfg["text_field"],
    }
    if cfg["val_head_tokens"] is not None:  # only when set, so the C4 / OpenWebText caches keep their names
        fingerprint["val_head_tokens"] = cfg["val_head_tokens"]
    if row_length(cfg):
        fingerprint["unpacked_row_len"] = row_length(cfg)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg["cache_dir"]) / f"{cfg['name']}-{digest}"


def row_length(cfg: Mapping) -> int | None:
    """data.packing=false: each document in a row of seq_len + 1 tokens (data/prepare.py unpacked_rows)."""
    return None if cfg.get("packing", True) else int(cfg["seq_len"]) + 1


def check_validation_rule(cfg: Mapping) -> None:
    """At most one way to make the validation split; val_head_tokens fixes its size itself."""
    head = cfg["val_head_tokens"]
    if head is None:
        return
    if row_length(cfg):
        raise DataError(f"data.val_head_tokens={head} cuts the packed token stream: it needs data.packing=true")
    if cfg["val_fraction"] is not None or cfg["val_max_tokens"] is not None:
        raise DataError(f"data.val_head_tokens={head} makes the validation split (the first {head} tokens of the train "
                        f"stream): set data.val_fraction=null and data.val_max_tokens=null, or data.val_head_tokens=null")
    if int(head) <= 0:
        raise DataError(f"data.val_head_tokens={head} must be a positive number of tokens (or null)")


def prepare_hf(cfg: Mapping) -> Path:
    """Tokenize the train and validation splits into shards (idempotent: a complete, valid result is
    reused; a partial or corrupt one is rewritten)."""
    check_validation_rule(cfg)
    out_dir = hf_dataset_dir(cfg)
    if is_complete(out_dir):
        return out_dir
    files = local_split_files(cfg) if cfg["data_files"] else None
    if files is None:
        why = hub_reachable()
        if why:
            raise offline_error(cfg, why)
    hf_cache = Path(cfg["cache_dir"]) / "hf"
    field = cfg["text_field"]
    texts = lambda ds: (row[field] for row in ds)  # noqa: E731
    batches = lambda ds: tokenize(texts(ds), cfg["eot"], int(cfg["num_proc"]), tokenizer=cfg.get("tokenizer"),  # noqa: E731
                                  row_len=row_length(cfg))
    held_out, head = cfg["val_fraction"] is not None, cfg["val_head_tokens"]
    if head is not None:  # one train stream: its first `head` tokens are validation (llm.c's FineWeb split)
        train = load_split(cfg, "train", files["train"] if files else None, hf_cache)
        boundary = load_tokenizer(cfg.get("tokenizer")).document_token(cfg["eot"])
        val_batches, train_batches = split_head(batches(train), int(head), boundary)
        sources = {"val": val_batches, "train": train_batches}
        rule = f"the first {head} tokens of the train stream (llm.c's FineWeb split)"
    elif held_out:  # one train split, a fixed fraction of its documents held out (nanoGPT's rule)
        dataset = load_split(cfg, "train", files["train"] if files else None, hf_cache)
        parts = dataset.train_test_split(test_size=cfg["val_fraction"], seed=cfg["val_seed"], shuffle=True)
        sources = {"train": parts["train"], "val": parts["test"]}
        rule = f"train_test_split(test_size={cfg['val_fraction']}, seed={cfg['val_seed']}, shuffle=True) of the documents"
    else:
        sources = {split: load_split(cfg, split, files[split] if files else None, hf_cache) for split in ("train", "val")}
        rule = "the dataset's own validation split"
    meta = base_meta(cfg["name"], cfg["eot"], source_description(cfg), rule, cfg["val_seed"] if held_out else None,
                     cfg.get("tokenizer"))
    meta["packing"] = {"packed": row_length(cfg) is None, "row_len": row_length(cfg)}
    meta["config"] = {k: cfg[k] for k in ("hf_path", "hf_name", "hf_revision", "text_field", "val_fraction", "val_seed",
                                          "val_head_tokens", "max_tokens")}
    for split, source in sources.items():  # datasets, or (val_head_tokens) token batches already
        total = len(source) if hasattr(source, "__len__") else None
        split_batches = source if head is not None else batches(source)
        cap = cfg["max_tokens"] if split == "train" else cfg["val_max_tokens"]
        if cap is not None and row_length(cfg):  # caps count sequence tokens; a row holds one more (its last pad)
            cap = int(cap) // (row_length(cfg) - 1) * row_length(cfg)
        meta["splits"][split] = write_split(out_dir, split, split_batches, int(cfg["shard_tokens"]), cap, total)
    if head is not None and not meta["splits"]["train"]["tokens"]:
        raise DataError(f"{cfg['name']}: the train stream holds only {meta['splits']['val']['tokens']:,} tokens, all of them "
                        f"taken by data.val_head_tokens={head}; lower data.val_head_tokens")
    meta["splits"] = {split: meta["splits"][split] for split in ("train", "val")}  # val was written first above
    return finish(out_dir, meta)
