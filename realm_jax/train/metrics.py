"""Metrics: a JSONL file and TensorBoard event files under WORKDIR/metrics, and a progress
line. Only the process that writes once (process 0) writes."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping

import jax

from realm_jax.workdir import Workdir

_log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(Workdir(workdir).metrics_dir)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.path / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
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
    parts = [f"step {step}/{total}"]
    for k, v in values.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)
