"""The config tree's Python side: what its YAML refers to beyond its own files, and composing it
without Hydra's app wrapper (for scripts and tests). train.py calls `register()` first; `compose()`
does it itself.

What the YAML refers to:
  * the resolvers ${muonlab_root:} (the repository root), ${asset:NAME} (a file in data/assets) and
    ${tokenizer_dir:NAME} ($MUONLAB_TOKENIZERS/NAME, a local copy of a tokenizer's files, when that
    variable is set; else null: the hub);
  * the `python_defaults` nodes: `python_defaults/<target>` holds every keyword default of that
    optimizer's constructor (an Orthogonalizer default as its fields), so an optim file includes
    `- /python_defaults@matrix: optim.Muon` and states only where it departs from them. The Python
    signature is the one home of each default; `python train.py --cfg job` shows them all and any
    of them is a plain override (`optim.matrix.orthogonalizer.steps=3`).

    from configs import compose
    cfg = compose(["optim=muon_nsr", "model=llama_60m"])   # what `python train.py ...` would see
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ASSETS = ROOT / "data" / "assets"


TORCH_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Muon")  # the aux part and the reference Muon


@functools.cache
def register() -> None:
    """Register the resolvers and the python_defaults nodes, once per process (every compose() asks)."""
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("muonlab_root", lambda: str(ROOT), replace=True)
    OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name), replace=True)
    OmegaConf.register_new_resolver("tokenizer_dir", tokenizer_dir, replace=True)
    store = ConfigStore.instance()
    for target in optimizer_targets():
        store.store(group="python_defaults", name=target, node=python_defaults(target))


def tokenizer_dir(name: str) -> str | None:
    """$MUONLAB_TOKENIZERS/<name> where that variable is set (tokenizers staged on a cluster without the
    hub; the tests' tiny ones), else None."""
    root = os.environ.get("MUONLAB_TOKENIZERS")
    return str(Path(root) / name) if root else None


def optimizer_targets() -> list[str]:
    """Every matrix optimizer muonlab exports, and the torch optimizers the configs use."""
    import optim

    exported = [getattr(optim, name) for name in optim.__all__]
    matrix = [f"optim.{cls.__name__}" for cls in exported
              if isinstance(cls, type) and issubclass(cls, optim.MatrixOptimizer) and cls is not optim.MatrixOptimizer]
    return matrix + list(TORCH_OPTIMIZERS)


def python_defaults(target: str) -> dict:
    """{"_target_": target, name: default, ...} for every keyword argument of target's constructor
    that has a default (tuples as lists, an Orthogonalizer as the dict of its fields)."""
    from hydra.utils import get_class

    from optim import Orthogonalizer
    from optim.matrix import constructor_defaults

    node = {"_target_": target}
    for name, value in constructor_defaults(get_class(target)).items():
        if isinstance(value, Orthogonalizer):
            value = value.settings()
        node[name] = list(value) if isinstance(value, tuple) else value
    return node


def compose(overrides: list[str] = (), config_name: str = "train", return_hydra_config: bool = False):
    """The composed config for `overrides`, as `python train.py <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
