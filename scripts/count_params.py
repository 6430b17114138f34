"""Parameter counts of a model config, built on the meta device (no weights are allocated).

    python scripts/count_params.py model=gpt2_125m
    python scripts/count_params.py model=llama_1b model.vocab_size=32000
"""

import sys

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from models import ModelConfigError, build_model, count_parameters
from configs import compose


def main(argv: list[str]) -> int:
    try:
        cfg = compose(argv, return_hydra_config=True)
        spec = OmegaConf.to_container(cfg.model, resolve=True)
        with torch.device("meta"):
            model = build_model(spec)
    except (HydraException, ModelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = count_parameters(model)
    tied = model.lm_head.weight is next(m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding))
    print(f"{cfg.hydra.runtime.choices.model}: {count.total / 1e6:.1f}M parameters ({count.total:,}); "
          f"non-embedding {count.non_embedding / 1e6:.1f}M; hidden matrices {count.hidden_matrices / 1e6:.1f}M; "
          f"{spec['family']}, vocab {spec['vocab_size']}, {'tied' if tied else 'untied'} head")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
