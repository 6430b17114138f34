"""A data config's prepared token set: where it lives, preparing it (once, under the lock), opening it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from data.hf import hf_dataset_dir, prepare_hf
from data.lock import preparation_lock
from data.shards import DataError, TokenSet, open_token_set, read_meta
from data.text import check_source, prepare_text_file, text_dataset_dir

KINDS = ("text", "hf")


def _check_kind(cfg: Mapping) -> None:
    if cfg["kind"] not in KINDS:
        raise DataError(f"data.kind={cfg['kind']!r} is not one of {list(KINDS)}")
    if cfg["kind"] == "text" and not cfg.get("packing", True):
        raise DataError(f"data.packing=false pads each document to data.seq_len, but data={cfg['name']} is one document "
                        f"(a text file); use a corpus of documents (data=c4, openwebtext, fineweb, ...)")


def dataset_dir(cfg: Mapping) -> Path:
    """The directory that holds (or will hold) this data config's token shards."""
    _check_kind(cfg)
    if cfg["kind"] == "hf":
        return hf_dataset_dir(cfg)
    return text_dataset_dir(Path(cfg["cache_dir"]), cfg["name"], check_source(Path(cfg["source"])), cfg["val_fraction"],
                            cfg.get("tokenizer"), cfg.get("eot", "append"))


def prepare_dataset(cfg: Mapping) -> Path:
    """Tokenize the source into shards: a complete result is reused, a partial or corrupt one rewritten.
    One process at a time (data/lock.py): one that waited for another reuses the other's result."""
    with preparation_lock(dataset_dir(cfg)):
        return prepare_dataset_unlocked(cfg)


def prepare_dataset_unlocked(cfg: Mapping) -> Path:
    """prepare_dataset() without the lock, for a caller that holds it."""
    _check_kind(cfg)
    if cfg["kind"] == "hf":
        return prepare_hf(cfg)
    return prepare_text_file(Path(cfg["source"]), dataset_dir(cfg), cfg["name"], cfg["val_fraction"], cfg.get("tokenizer"),
                             cfg.get("eot", "append"))


def open_dataset(cfg: Mapping) -> TokenSet:
    """The prepared token set, preparing it on first use (under the lock, so once however many processes
    open it); a corrupt one is an error, not rewritten behind the user's back (`scripts/prepare_data.py`
    rewrites it)."""
    directory = dataset_dir(cfg)
    if read_meta(directory) is None:
        prepare_dataset(cfg)
    hint = f"Rewrite it with `python scripts/prepare_data.py data={cfg['name']}`, or delete {directory}."
    return open_token_set(directory, hint)
