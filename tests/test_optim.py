"""The optimizer's per-part learning-rate multipliers (train.lr_multipliers)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from realm_jax.train.optim import make_optimizer
from realm_jax.tasks.rag import RagTask


def _train(**more):
    return ml_collections.ConfigDict(dict(
        learning_rate=0.1, warmup_steps=1, steps=10, decay="constant", weight_decay=0.01,
        clip_norm=1.0, **{"lr_multipliers": {}, **more}))


def _updates(optimizer, params, grads):
    """The second step's updates (the warmup starts the learning rate at 0)."""
    state = optimizer.init(params)
    _, state = optimizer.update(grads, state, params)
    updates, _ = optimizer.update(grads, state, params)
    return updates


PARAMS = {"query_tower": {"w": jnp.ones((2, 3))}, "doc_tower": {"w": jnp.full((2, 3), 2.0)},
          "reader": {"b": jnp.arange(3.0)}}
GRADS = jax.tree.map(lambda p: 0.1 * p + 0.05, PARAMS)


def test_lr_multipliers_scale_each_part_weight_decay_included():
    plain = _updates(make_optimizer(_train()), PARAMS, GRADS)
    scaled = _updates(make_optimizer(_train(lr_multipliers=dict(query_tower=0.1, doc_tower=0.0))),
                      PARAMS, GRADS)
    assert float(jnp.abs(plain["doc_tower"]["w"]).min()) > 0
    np.testing.assert_allclose(scaled["query_tower"]["w"], 0.1 * plain["query_tower"]["w"],
                               rtol=1e-6)
    np.testing.assert_array_equal(scaled["doc_tower"]["w"], 0.0)      # frozen
    np.testing.assert_array_equal(scaled["reader"]["b"], plain["reader"]["b"])
    # Same state structure with or without factors (a run can change them on resume).
    assert (jax.tree.structure(make_optimizer(_train()).init(PARAMS))
            == jax.tree.structure(make_optimizer(_train(lr_multipliers=dict(reader=2.0)))
                                  .init(PARAMS)))


def test_lr_multipliers_name_an_unknown_part():
    optimizer = make_optimizer(_train(lr_multipliers=dict(query_encoder=0.5)))
    with pytest.raises(ValueError, match=r"train.lr_multipliers names \['query_encoder'\]"):
        _updates(optimizer, PARAMS, GRADS)


def test_rag_question_encoder_multiplier_is_a_part_multiplier():
    params = {"question_encoder": {"w": jnp.ones((2, 2))}, "generator": {"w": jnp.ones((2, 2))}}
    grads = jax.tree.map(lambda p: 0.3 * p, params)
    task = RagTask.__new__(RagTask)  # the task's multipliers need only its config
    task.config = ml_collections.ConfigDict(dict(
        model=dict(train_doc_tower=False), train=_train(question_encoder_lr_multiplier=0.25)))
    rag = _updates(make_optimizer(task.config.train, task.lr_multipliers()), params, grads)
    plain = _updates(make_optimizer(_train()), params, grads)
    np.testing.assert_allclose(rag["question_encoder"]["w"], 0.25 * plain["question_encoder"]["w"],
                               rtol=1e-6)
    np.testing.assert_array_equal(rag["generator"]["w"], plain["generator"]["w"])
