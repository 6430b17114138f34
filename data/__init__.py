"""Tokenizer, tokenized shards, the stateless sampler and the torch datasets over them.

    from data import open_dataset
    tokens = open_dataset({"name": "shakespeare", "kind": "text", "source": ..., "val_fraction": 0.1,
                           "cache_dir": ".cache"})
    tokens.splits["train"], tokens.splits["val"]    # TokenStreams

Each name below is imported from its submodule on first use, so importing one submodule costs only
that module's own imports: `data.files` (trainer/metrics.py, the analysis scripts) pulls no torch,
numpy or tiktoken.
"""

import importlib

_SUBMODULE = {  # public name -> the submodule that defines it
    "DataError": "shards", "TokenSet": "shards", "TokenStream": "shards",
    "SequenceSampler": "sampler", "step_indices": "sampler",
    "TrainBatches": "batches", "validation_windows": "batches",
    "EOT_ID": "tokenizer", "N_VOCAB": "tokenizer", "gpt2_tokenizer": "tokenizer",
    "dataset_dir": "dataset", "open_dataset": "dataset", "prepare_dataset": "dataset",
}
__all__ = sorted(_SUBMODULE)


def __getattr__(name: str):
    if name not in _SUBMODULE:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"data.{_SUBMODULE[name]}"), name)
