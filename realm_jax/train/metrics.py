"""Metrics: a JSONL file and TensorBoard event files under WORKDIR/metrics, a progress line
(only process 0 writes), and the FLOP count that MFU divides by."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
from jax.extend import core as jax_core

from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike):
        self.enabled = jax.process_index() == 0
        self.path = Path(Workdir(workdir).metrics_dir)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.path / "metrics.jsonl", "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        except ImportError:
            _log.warning("tensorboardX is not installed: metrics go to JSONL only")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = Path(Workdir(workdir).metrics_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_line(step: int, total: int, values: Mapping[str, float]) -> str:
    return " | ".join([f"step {step}/{total}", *(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())])


def matmul_flops(fn: Callable, *args) -> float:
    """FLOPs of the matrix products of one call of `fn(*args)`, counted from its jaxpr (traced,
    not compiled): a dot_general counts 2 x (its batch, free and contracted sizes
    multiplied); a scan's body counts `length` times, a cond's costliest branch once, a
    while loop's body once (its trip count is not known when tracing). XLA's cost analysis
    counts a scanned body once, so it reads num_layers times low with `scan_layers`;
    elementwise work is left out, as MFU conventionally leaves it. A step with
    rematerialisation counts the recomputed products too."""
    # a jitted fn traces as itself: inside make_jaxpr it would be a nested jit, which may
    # not carry compiler_options
    traced = fn.trace(*args).jaxpr if hasattr(fn, "trace") else jax.make_jaxpr(fn)(*args)
    return jaxpr_matmul_flops(traced)


def jaxpr_matmul_flops(jaxpr) -> float:
    """`matmul_flops` of a traced function's ClosedJaxpr (e.g. `jit(f).trace(...).jaxpr`) or
    Jaxpr."""
    total = 0.0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "dot_general":
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            rhs_free = [n for i, n in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
            total += 2.0 * math.prod(lhs) * math.prod(rhs_free)
            continue
        inner = [jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params)]
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        elif eqn.primitive.name == "cond":
            total += max(inner, default=0.0)
        else:
            total += sum(inner)
    return total


def _sub_jaxprs(params: dict) -> Iterator:
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
                yield item
