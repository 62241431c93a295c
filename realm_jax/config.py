"""Experiment configs: `configs/NAME.py` defines `get_config(arg=None) -> ConfigDict`.

On the command line: `--config configs/x.py[:arg]` and any field overridden with
`--config.train.steps=100` (ml_collections' config flags, on a private flag registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from realm_jax.models.encoder import EncoderConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def parse_config_flags(argv: Sequence[str], default: str | None = None
                       ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Pull `--config=...` and `--config.*` overrides out of argv. Returns the config and the
    remaining arguments."""
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default, "experiment config file",
                                    flag_values=registry, lock_config=False)
    ours = [a for a in argv if a.startswith("--config")]
    # "--config x.py" as two words
    rest, i = [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            ours.remove(a)
            ours.append(f"--config={argv[i + 1]}")
            i += 2
            continue
        if not a.startswith("--config"):
            rest.append(a)
        i += 1
    registry(["realm-jax"] + ours)
    config = registry.config
    if config is None:
        raise ValueError("no config given: pass --config configs/NAME.py")
    return config, rest


def load_config(name_or_path: str, *overrides: str) -> ml_collections.ConfigDict:
    """Load `configs/NAME.py` (or a path, optionally `:arg`) with `field=value` overrides."""
    path, _, arg = name_or_path.partition(":")
    if not path.endswith(".py"):
        path = str(CONFIG_DIR / f"{path}.py")
    spec = path + (f":{arg}" if arg else "")
    config, _ = parse_config_flags([f"--config={spec}"] + [f"--config.{o}" for o in overrides])
    return config


def encoder_config(model: ml_collections.ConfigDict) -> EncoderConfig:
    """An EncoderConfig from a config's `model.encoder` section (sizes and run-time knobs)."""
    return EncoderConfig(**{k: v for k, v in model.to_dict().items()})
