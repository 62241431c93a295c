"""Model checkpoints in realm-jax's own format: an orbax PyTree of params plus
`model.json` (the model config), written to a temporary folder and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from realm_jax.models import config_from_dict, config_to_dict

MODEL_JSON = "model.json"
PARAMS_DIR = "params"


def save_params(folder: str | os.PathLike, cfg, params) -> Path:
    folder = Path(folder).absolute()
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / PARAMS_DIR, params)
    (tmp / MODEL_JSON).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_params(folder: str | os.PathLike, shardings=None):
    """(model config, params). With `shardings` (a tree of NamedShardings) the params are
    restored directly onto their shards; otherwise as host numpy arrays."""
    folder = Path(folder).absolute()
    meta = folder / MODEL_JSON
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: missing; {folder} is not a realm-jax params checkpoint")
    cfg = config_from_dict(json.loads(meta.read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        if shardings is None:
            restored = ckptr.restore(folder / PARAMS_DIR)
            params = jax.tree.map(np.asarray, restored)
        else:
            from realm_jax import hf
            shapes = hf.abstract_params(cfg)
            target = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
            params = ckptr.restore(folder / PARAMS_DIR, target)
    return cfg, params
