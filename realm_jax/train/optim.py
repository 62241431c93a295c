"""The optimizer: AdamW with linear warmup then linear or cosine decay, global-norm
clipping, and no weight decay on biases and LayerNorm parameters."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           decay: str = "linear", end_factor: float = 0.0) -> optax.Schedule:
    warmup_steps = max(int(warmup_steps), 1)
    decay_steps = max(int(total_steps) - warmup_steps, 1)
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    if decay == "linear":
        after = optax.linear_schedule(peak, peak * end_factor, decay_steps)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end_factor)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"train.decay={decay!r}: expected linear, cosine or constant")
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params):
    """True for the weights that get weight decay: kernels and embeddings, not biases or
    LayerNorm scales (any leaf with fewer than 2 dimensions)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(train) -> optax.GradientTransformation:
    """From a config's `train` section: learning_rate, warmup_steps, steps, decay,
    weight_decay, clip_norm (Adam's betas and epsilon are BERT's)."""
    schedule = learning_rate_schedule(train.learning_rate, train.warmup_steps, train.steps,
                                      train.decay)
    return optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-6, weight_decay=train.weight_decay,
                    mask=decay_mask))
