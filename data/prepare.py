"""From documents to token shards: a tokenizer (data/tokenizer.py) in worker processes, and the shard writer.

Each document is encoded without special tokens (special-token text in a document stays text) and
gets its boundary tokens (`data.eot`): the tokenizer's EOS appended (nanoGPT's EOT, T5's </s>), its
BOS prepended (LLaMA-2's <s>; modded-nanogpt's EOT), or both (LLaMA-3). Batches of documents are
encoded in order, in this process (num_proc=1) or by `num_proc` spawned processes, so the token
stream does not depend on `num_proc`.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.shards import FORMAT_VERSION, write_meta, write_shard
from data.tokenizer import RANKS_SHA256, TokenizerError, load_tokenizer


def encode_batch(texts: list[str], eot_placement: str = "append", tokenizer: Mapping | None = None,
                 row_len: int | None = None) -> np.ndarray:
    """One array (the tokenizer's shard dtype): every document's tokens with its boundary tokens, in order;
    with `row_len` (data.packing=false) each document in a row of its own (see unpacked_rows)."""
    tok = load_tokenizer(tokenizer)
    before, after = tok.boundary(eot_placement)
    docs = tok.encode_batch(texts)
    if row_len is not None:
        return unpacked_rows(docs, before, after, row_len, tok).ravel()
    return np.fromiter(itertools.chain.from_iterable(before + doc + after for doc in docs), dtype=tok.dtype)


def unpacked_rows(docs: list[list[int]], before: list[int], after: list[int], row_len: int, tok) -> np.ndarray:
    """One row of `row_len` = seq_len + 1 tokens per document: its text truncated so that, with its boundary
    tokens, it fills at most seq_len positions (GaLore: max_length=256, truncation keeps </s>), then the pad.
    A row's last token is always a pad: seq_len inputs and seq_len targets, the last target masked."""
    pad = tok.padding()
    keep = row_len - 1 - len(before) - len(after)
    if keep < 1:
        raise TokenizerError(f"data.seq_len={row_len - 1} leaves no room for text beside the boundary tokens")
    rows = np.full((len(docs), row_len), pad, dtype=tok.dtype)
    for row, doc in zip(rows, docs):
        ids = before + doc[:keep] + after
        row[:len(ids)] = ids
    return rows


def _encode_counted(texts: list[str], eot_placement: str, tokenizer: Mapping | None, row_len: int | None) -> tuple[np.ndarray, int]:
    return encode_batch(texts, eot_placement, tokenizer, row_len), len(texts)


def batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    return iter(lambda: list(itertools.islice(iterator, n)), [])


def tokenize(texts: Iterable[str], eot_placement: str = "append", num_proc: int = 1, docs_per_batch: int = 256,
             tokenizer: Mapping | None = None, row_len: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, n_documents) per batch of documents, in document order (rows of `row_len`: unpacked)."""
    encode_batch([], eot_placement, tokenizer, row_len)  # a bad placement, tokenizer or pad fails here, not in a worker
    batches = batched(texts, docs_per_batch)
    encode = functools.partial(_encode_counted, eot_placement=eot_placement, tokenizer=tokenizer, row_len=row_len)
    if num_proc <= 1:
        yield from map(encode, batches)
        return
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        yield from pool.imap(encode, batches, chunksize=1)


def split_head(batches: Iterable[tuple[np.ndarray, int]], n_tokens: int, boundary_id: int) -> tuple[Iterator, Iterator]:
    """(head, tail) of one (tokens, n_documents) batch stream: head yields its first n_tokens tokens,
    tail the rest, starting with the remainder of the batch that crosses the boundary (a document there
    is split, as llm.c splits its FineWeb shards). Read head to its end before tail. A document is
    counted in the part that holds its boundary token `boundary_id`."""
    iterator, crossing = iter(batches), []

    def head() -> Iterator[tuple[np.ndarray, int]]:
        taken = 0
        for tokens, n_docs in iterator:
            if taken + len(tokens) >= n_tokens:
                cut = n_tokens - taken
                head_docs = int(np.count_nonzero(tokens[:cut] == boundary_id))
                crossing.append((tokens[cut:], n_docs - head_docs))
                yield tokens[:cut], head_docs
                return
            taken += len(tokens)
            yield tokens, n_docs

    def tail() -> Iterator[tuple[np.ndarray, int]]:
        yield from crossing
        yield from iterator

    return head(), tail()


class ShardWriter:
    """Cuts one split's token stream into shards of `shard_tokens` tokens, written atomically."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = Path(directory), split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.pending)
        file = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.directory / file, stream[:n], stream.dtype)
        self.shards.append({"file": file, "tokens": int(n)})
        self.pending, self.pending_tokens = ([stream[n:]] if len(stream) > n else []), len(stream) - n

    def close(self) -> dict:
        if self.pending_tokens:
            self._flush(self.pending_tokens)
        return {"tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def write_split(directory: Path, split: str, batches: Iterable[tuple[np.ndarray, int]], shard_tokens: int,
                max_tokens: int | None = None, total_documents: int | None = None) -> dict:
    """Write a split's (tokens, n_documents) batches as shards, stopping at max_tokens; its sidecar entry."""
    writer, documents, tokens = ShardWriter(directory, split, shard_tokens), 0, 0
    with tqdm(total=total_documents, unit="doc", desc=f"tokenize {split}", dynamic_ncols=True, disable=None) as bar:
        for batch, n_docs in batches:
            if max_tokens is not None and tokens + len(batch) > max_tokens:
                batch = batch[: max_tokens - tokens]
            writer.add(batch)
            tokens += len(batch)
            documents += n_docs
            bar.update(n_docs)
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
            if max_tokens is not None and tokens >= max_tokens:
                break
    entry = {**writer.close(), "documents": documents}
    print(f"{split}: {documents:,} documents, {entry['tokens']:,} tokens in {len(entry['shards'])} shard(s)", flush=True)
    return entry


def base_meta(name: str, eot_placement: str, source: dict, validation_rule: str, seed: int | None,
              tokenizer: Mapping | None = None) -> dict:
    """The sidecar's fields every prepared dataset shares; `splits` is filled in as they are written."""
    tok = load_tokenizer(tokenizer)
    identity = tok.identity()
    return {
        "format": "muonlab-tokens", "version": FORMAT_VERSION, "name": name, "tokenizer": tok.name,
        "tokenizer_sha256": identity["sha256"][0], "tokenizer_identity": identity, "eot_id": tok.document_token(eot_placement),
        "eot_placement": eot_placement, "dtype": tok.dtype.name, "source": source, "validation_rule": validation_rule,
        "seed": seed, "splits": {},
    }


def tokenizer_fingerprint(tokenizer: Mapping | None) -> dict:
    """The cache-name entries for a tokenizer: GPT-2's sha256 alone (so its caches keep the names they
    had before other tokenizers), any other's whole identity."""
    tok = load_tokenizer(tokenizer)
    if tok.name == "gpt2" and tok.identity()["sha256"] == [RANKS_SHA256]:
        return {"tokenizer_sha256": RANKS_SHA256}
    return {"tokenizer": tok.identity()}


def finish(directory: Path, meta: dict) -> Path:
    """Write the sidecar last: its presence marks the dataset as complete."""
    write_meta(directory, meta)
    return Path(directory)
