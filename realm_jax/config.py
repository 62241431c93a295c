"""Experiment configs: `configs/NAME.py` defines `get_config(arg=None) -> ConfigDict`.

On the command line: `--config configs/x.py[:arg]`, and any field overridden with
`--config.train.steps=100` (the value is parsed to the field's current type)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from realm_jax.models.bart import BartConfig
from realm_jax.models.encoder import EncoderConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _load_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        path = str(CONFIG_DIR / f"{path}.py")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config: no config file {path}")
    module_spec = importlib.util.spec_from_file_location(f"realm_jax_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config: {path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(raw: str, current: Any, flag: str) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            return type(current)(ast.literal_eval(raw) if isinstance(current, int) else float(raw))
        if isinstance(current, str):
            return raw
        if isinstance(current, (tuple, list)):
            return type(current)(ast.literal_eval(raw))
        try:  # None or other: a Python literal, else the string itself
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"{flag}={raw}: cannot be read as {type(current).__name__}") from e


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    flag = f"--config.{dotted}"
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ValueError(f"{flag}: no config section {name!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"{flag}: no such field (known here: {', '.join(sorted(node.keys()))})")
    node[leaf] = _parse_value(raw, node[leaf], flag)


def parse_config_flags(argv: Sequence[str], default: str | None = None
                       ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Pull `--config PATH` / `--config=PATH` and `--config.a.b=value` out of argv.
    Returns the config and the remaining arguments."""
    spec, overrides, rest = default, [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            spec, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            dotted, eq, raw = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a}: needs a value")
                raw, i = argv[i + 1], i + 1
            overrides.append((dotted, raw))
        else:
            rest.append(a)
        i += 1
    if spec is None:
        raise ValueError("no config given: pass --config configs/NAME.py")
    config = _load_file(spec)
    for dotted, raw in overrides:
        apply_override(config, dotted, raw)
    return config, rest


def load_config(name_or_path: str, *overrides: str) -> ml_collections.ConfigDict:
    """Load `configs/NAME.py` (or a path, optionally `:arg`) with `field=value` overrides."""
    config, _ = parse_config_flags([f"--config={name_or_path}"] + [f"--config.{o}" for o in overrides])
    return config


# `train.fast_compile`: cheap XLA compilation, for CPU tests where compiling a step takes
# longer than running it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiler_options(config: ml_collections.ConfigDict) -> dict | None:
    """The XLA options of a run's jitted functions (`train.fast_compile`)."""
    return FAST_COMPILE if config.train.fast_compile else None


def model_knobs(section: ml_collections.ConfigDict) -> dict:
    """The run-time settings of a model section that apply to pretrained weights too (the
    sizes come from the weights' folder)."""
    return {k: section[k] for k in ("dtype", "scan_layers", "remat") if k in section}


def encoder_config(section: ml_collections.ConfigDict) -> EncoderConfig:
    """An EncoderConfig from a config section such as `model.encoder` (sizes and knobs)."""
    return EncoderConfig(**section.to_dict())


def bart_config(section: ml_collections.ConfigDict) -> BartConfig:
    """A BartConfig from a config section such as `model.generator`."""
    return BartConfig(**section.to_dict())
