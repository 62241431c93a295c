"""Shared by the corpus-embedding and refresher tests: a tiny document tower over the real
BERT vocabulary (the stores hold MiniLM token ids), a JSONL corpus of random words, and a
way to damage a checkpoint step."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jax
import numpy as np

from realm_jax import models
from realm_jax.models import EmbedderConfig, EncoderConfig

# Mean pooling: a random tiny tower's CLS vectors are all nearly the same.
TOWER = EmbedderConfig(EncoderConfig(
    vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
    max_position_embeddings=128, dropout_rate=0.0, attention_dropout_rate=0.0), pooling="mean")
WORDS = ("river city king music science history ocean mountain village bridge garden winter "
         "summer market school doctor painter engine island forest castle railway harbor "
         "church museum valley army north south golden silver ancient modern").split()


def write_corpus(path, n_docs: int, seed: int = 0, max_passages: int = 5):
    """JSONL documents of 1 to `max_passages` times 12 words: their 12-word DPR passages
    all pad to one length bucket."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(12 * rng.randint(1, max_passages)))
            f.write(json.dumps({"id": f"d{i}", "title": f"{rng.choice(WORDS).title()} {i}",
                                "text": text.capitalize() + "."}) + "\n")
    return path


def numpy_params(cfg, seed: int, std: float = 0.05) -> dict:
    """Random params of any model config, made in numpy from its abstract shapes (JAX's
    op-by-op init, e.g. of a 30522-word table, takes seconds on the emulated devices):
    normal(std) weights, zero biases, unit LayerNorm scales."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(shape.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(shape.shape, np.float32)
        return (std * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, models.abstract_params(cfg))


def random_tower(seed: int):
    """Random TOWER params."""
    return numpy_params(TOWER, seed)


def damage_checkpoint(checkpoint_dir: Path) -> None:
    """Truncate every data file of a checkpoint step's params (a disk that filled up or a
    copy cut short): the step is still listed, but nothing of it restores."""
    files = [p for p in (checkpoint_dir / "params").rglob("*") if p.is_file()
             and p.stat().st_size > 64 and "metadata" not in p.name.lower()]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:16])




def train_beside_refresher(config, workdir, from_hf=None) -> dict:
    """`trainer.train(config, workdir)` with a refresher thread keeping WORKDIR/index up to
    date (its first index from `from_hf` when given); the refresher must stop once the
    trainer has finished."""
    import threading

    from realm_jax.refresh import Refresher, RefreshSettings
    from realm_jax.train import trainer

    refresher = Refresher(workdir, RefreshSettings.from_config(config), from_hf=from_hf,
                          progress=False)
    thread = threading.Thread(target=refresher.run, daemon=True)
    thread.start()
    result = trainer.train(config, workdir)
    thread.join(120)
    assert not thread.is_alive(), "the refresher did not stop after the trainer finished"
    return result
