"""The config tree's Python side: the resolvers its YAML uses, and composing it without Hydra's app
wrapper (for scripts and tests). train.py and every script call `register_resolvers()` first;
`compose()` does it itself.

    from configs import compose
    cfg = compose(["optim=muon_nsr", "model=llama_60m"])   # what `python train.py ...` would see
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ASSETS = ROOT / "data" / "assets"


def register_resolvers() -> None:
    """${muonlab_root:} is the repository root; ${asset:NAME} a file shipped in data/assets."""
    OmegaConf.register_new_resolver("muonlab_root", lambda: str(ROOT), replace=True)
    OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name), replace=True)


def compose(overrides: list[str] = (), config_name: str = "train", return_hydra_config: bool = False):
    """The composed config for `overrides`, as `python train.py <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
