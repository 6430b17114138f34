"""Tokenize a dataset into muonlab token shards (idempotent: complete shards are reused, partial or
corrupt ones rewritten). Training does this on first use; run it ahead of time, or to repair a cache.

    python scripts/prepare_data.py data=shakespeare
"""

import sys

from hydra.errors import HydraException

import data
from configs import compose


def main(argv: list[str]) -> int:
    try:
        cfg = compose(argv)
        directory = data.prepare_dataset(cfg.data)
        tokens = data.open_dataset(cfg.data)
    except (HydraException, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {len(stream):,} tokens" for split, stream in tokens.splits.items())
    print(f"{cfg.data.name}: {counts} in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
