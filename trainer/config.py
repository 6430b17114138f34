"""Config helpers shared by train.py and the scripts: the resolvers the YAML tree uses, and
composing the tree without Hydra's app wrapper (for scripts and tests)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ASSETS = ROOT / "data" / "assets"

# ${muonlab_root:} is the repository root; ${asset:NAME} a file shipped in data/assets
OmegaConf.register_new_resolver("muonlab_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name), replace=True)


def compose(overrides: list[str] = (), config_name: str = "train", return_hydra_config: bool = False):
    """The composed config for `overrides`, as `python train.py <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
