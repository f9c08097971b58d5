"""Configuration files shipped with backbone-bench (backbone sets, grids, search spaces, experiments)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_file(name: str) -> Path:
    """Path of a shipped config file, e.g. ``config_file("backbones.yaml")``."""
    return CONFIG_DIR / name
