"""Experiment configs: `configs/NAME.py` defines `get_config(arg=None) -> ConfigDict`,
built from the sections of configs/common.py.

On the command line: `--config configs/x.py[:arg]` (or just `x[:arg]` for a file of
configs/), and any field overridden with `--config.train.steps=100`. ml_collections'
config_flags loads the file and reads each value as the field's type; the thin layer here
pulls those flags out of a command line that has others, names the flag in every error (as
ValueError or FileNotFoundError), and reads values for the two kinds of field config_flags
has no parser for: None (e.g. sharding_rules) and lists (a saved config.json's tuples)."""

from __future__ import annotations

import ast
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from realm_jax.models.bart import BartConfig
from realm_jax.models.encoder import EncoderConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _LiteralParser(flags.ArgumentParser):
    """A Python literal, else the string itself (for a field that is None)."""

    def parse(self, argument: Any) -> Any:
        if not isinstance(argument, str):
            return argument
        try:
            return ast.literal_eval(argument)
        except (ValueError, SyntaxError):
            return argument


class _ListParser(flags.ArgumentParser):
    """A list or tuple literal, as a list (for a list field)."""

    def parse(self, argument: Any) -> list:
        value = ast.literal_eval(argument) if isinstance(argument, str) else argument
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{argument!r} is not a list")
        return list(value)


def _resolve(spec: str) -> str:
    """`x[:arg]` -> `configs/x.py[:arg]`; the file must exist."""
    path, colon, arg = spec.partition(":")
    if not path.endswith(".py"):
        path = str(CONFIG_DIR / f"{path}.py")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config: no config file {path}")
    return path + colon + arg


@contextlib.contextmanager
def _configs_importable(path: str) -> Iterator[None]:
    """While the config file at `path` runs, its `from configs import common` finds the
    `configs` folder it sits in (else this checkout's): the installed package does not put
    the repository root on the import path."""
    folder = Path(path).resolve().parent
    root = str(folder.parent if folder.name == "configs" else CONFIG_DIR.parent)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        yield
    finally:
        if added:
            sys.path.remove(root)


def _load(spec: str) -> ml_collections.ConfigDict:
    spec = _resolve(spec)
    path = spec.partition(":")[0]
    argv = ["realm-jax", f"--config={spec}"]
    holder = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=holder, lock_config=False,
                                    sys_argv=argv)
    # config_flags loads the file as module `config_config` with importlib's deprecated
    # load_module(), which would run it inside the module a previous file left in
    # sys.modules (keeping that file's names, get_config included): drop it first.
    sys.modules.pop("config_config", None)
    with _configs_importable(path), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        try:
            holder(argv)
        except flags.Error as e:   # get_config raised: its error line, not the traceback
            raise ValueError(f"--config={spec}: {str(e).strip().splitlines()[-1]}") from e
        except AttributeError as e:
            if e.name != "get_config":
                raise
            raise ValueError(f"--config: {path} defines no get_config()") from e
    return holder.config


def _check_field(config: ml_collections.ConfigDict, dotted: str) -> None:
    flag = f"--config.{dotted}"
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ValueError(f"{flag}: no config section {name!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"{flag}: no such field (known here: {', '.join(sorted(node.keys()))})")


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets `--config.DOTTED=RAW` in `config` (e.g. a run's saved WORKDIR/config.json)
    through config_flags: RAW is read as the field's current type."""
    _check_field(config, dotted)
    argv = ["realm-jax", f"--config.{dotted}={raw}"]
    holder = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=holder, lock_config=False,
                                    sys_argv=argv)
    try:
        holder(argv)
    except flags.Error as e:   # "flag --config.a.b=x: <why>"
        raise ValueError(str(e).removeprefix("flag ")) from e


config_flags.register_flag_parser_for_type(type(None), _LiteralParser())
config_flags.register_flag_parser_for_type(list, _ListParser())


def parse_config_flags(argv: Sequence[str], default: str | None = None
                       ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Pull `--config PATH` / `--config=PATH` and `--config.a.b=value` (or `--config.a.b
    value`) out of argv. Returns the config and the remaining arguments."""
    spec, overrides, rest = default, [], []
    args = iter(argv)
    for a in args:
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            dotted, eq, raw = a[len("--config."):].partition("=")
            if not eq and (raw := next(args, None)) is None:
                raise ValueError(f"{a}: needs a value")
            overrides.append((dotted, raw))
        elif a == "--config" and (value := next(args, None)) is not None:
            spec = value
        else:
            rest.append(a)
    if spec is None:
        raise ValueError("no config given: pass --config configs/NAME.py")
    config = _load(spec)
    for dotted, raw in overrides:
        apply_override(config, dotted, raw)
    return config, rest


def load_config(name_or_path: str, *overrides: str) -> ml_collections.ConfigDict:
    """Load `configs/NAME.py` (or a path; either optionally `:arg`) with `field=value`
    overrides."""
    return parse_config_flags([f"--config={name_or_path}"]
                              + [f"--config.{o}" for o in overrides])[0]


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config (its config.json) over the defaults of its task's config file
    today (configs/TASK.py): a field added since the run was written reads its default, so
    no code keeps a fallback of its own. Saved values win; without that file, the saved
    config alone."""
    task = saved.get("task")
    try:
        defaults = _load(task).to_dict() if isinstance(task, str) and task else {}
    except FileNotFoundError:
        defaults = {}

    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict)
                           and isinstance(base.get(k), dict) else v for k, v in over.items()}}

    return ml_collections.ConfigDict(merge(defaults, saved))


# `train.fast_compile`: cheap XLA compilation, for CPU tests where compiling a step takes
# longer than running it.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiler_options(config: ml_collections.ConfigDict) -> dict | None:
    """The XLA options of a run's jitted functions (`train.fast_compile`)."""
    return FAST_COMPILE if config.train.fast_compile else None


def model_knobs(section: ml_collections.ConfigDict) -> dict:
    """The run-time settings of a model section that apply to pretrained weights too (the
    sizes come from the weights' folder)."""
    return {k: section[k] for k in ("dtype", "scan_layers", "remat", "attention")
            if k in section}


def encoder_config(section: ml_collections.ConfigDict) -> EncoderConfig:
    """An EncoderConfig from a config section such as `model.encoder` (sizes and knobs)."""
    return EncoderConfig(**section.to_dict())


def bart_config(section: ml_collections.ConfigDict) -> BartConfig:
    """A BartConfig from a config section such as `model.generator`."""
    return BartConfig(**section.to_dict())
