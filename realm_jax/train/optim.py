"""The optimizer: AdamW with linear warmup then linear or cosine decay, global-norm
clipping, no weight decay on biases and LayerNorm parameters, and optional learning-rate
multipliers per model part."""

from __future__ import annotations

from typing import Mapping

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


def scale_parts(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates of each top-level part of the parameters (e.g. "query_tower")
    by its factor: that part's learning rate, weight decay included. Parts not named keep
    theirs; a name that is not a part is an error at the first update."""
    multipliers = {str(k): float(v) for k, v in multipliers.items()}

    def update(updates, state, params=None):
        del params
        if not multipliers:
            return updates, state
        unknown = sorted(set(multipliers) - set(updates))
        if unknown:
            raise ValueError(f"train.lr_multipliers names {unknown}, which are not model "
                             f"parts (the parts: {sorted(updates)})")
        return {part: jax.tree.map(lambda u, f=multipliers.get(part, 1.0): u * f, value)
                for part, value in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train, multipliers: Mapping[str, float] | None = None
                   ) -> optax.GradientTransformation:
    """From a config's `train` section: learning_rate, warmup_steps, steps, decay,
    weight_decay, clip_norm (Adam's betas and epsilon are BERT's), and lr_multipliers
    ({part: factor}, see `scale_parts`; `multipliers` adds to or replaces them)."""
    schedule = learning_rate_schedule(train.learning_rate, train.warmup_steps, train.steps,
                                      train.decay)
    optimizer = optax.chain(
        optax.clip_by_global_norm(train.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-6, weight_decay=train.weight_decay,
                    mask=decay_mask))
    # Always chained, so that the optimizer state has one structure whatever the factors.
    factors = dict(train.lr_multipliers or {}, **(multipliers or {}))
    return optax.chain(optimizer, scale_parts(factors))
