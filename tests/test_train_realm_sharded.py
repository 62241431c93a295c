"""The REALM train step's loss and gradients (RealmLossFn under value_and_grad) sharded on
8 emulated CPU devices, data x fsdp and data x tensor, equal those on one device: in the
`scann` mode (candidates attached to the batch) and in the `device` mode (the exact search
of a sharded corpus inside the step). Tiny models (vocabulary 128) and a synthetic batch;
compiled with cheap XLA settings (the point is the partitioning, not the speed)."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax import config as config_lib
from realm_jax import sharding
from realm_jax.data.realm_examples import SpecialIds
from realm_jax.index.device import corpus_sharding
from realm_jax.tasks import realm

SPECIAL = SpecialIds(cls=1, sep=2, mask=3, pad=0)
B, Q, M, K, C = 8, 16, 4, 4, 12           # batch, query length, masks, candidates, block length
N, NUM_VALID, VOCAB = 64, 61, 128          # corpus rows (the last 3 are padding)
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MESHES = {"data_x_fsdp": (4, 2, 1), "data_x_tensor": (2, 1, 4)}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (emulated) devices")


@pytest.fixture(scope="module")
def models():
    """Tiny random models; the reader's matrices scaled up so that its predictions depend on
    the candidate: the retrieval scores' gradients (both towers') are then well above the
    rounding noise of a reader indifferent to what it reads."""
    configs, params = realm.build_models(config_lib.load_config("realm:tiny"))
    params["reader"] = jax.tree.map(lambda x: x * 20 if x.ndim >= 2 else x, params["reader"])
    return configs, params


def _query_batch(rng) -> dict:
    lengths = rng.integers(M + 4, Q + 1, B)
    ids = np.zeros((B, Q), np.int32)
    positions = np.zeros((B, M), np.int32)
    targets = np.zeros((B, M), np.int32)
    valid = np.zeros((B, M), bool)
    for b, n in enumerate(lengths):
        ids[b, 1:n - 1] = rng.integers(4, VOCAB, n - 2)
        ids[b, 0], ids[b, n - 1] = SPECIAL.cls, SPECIAL.sep
        m = int(rng.integers(1, M + 1))
        start = int(rng.integers(1, n - 1 - m + 1))
        positions[b, :m] = np.arange(start, start + m)
        targets[b, :m] = ids[b, start:start + m]
        valid[b, :m] = True
        ids[b, start:start + m] = SPECIAL.mask
    return {"input_ids": ids, "attention_mask": (np.arange(Q) < lengths[:, None]).astype(np.int32),
            "mask_positions": positions, "mask_targets": targets, "mask_valid": valid,
            "block_id": rng.integers(0, N, B).astype(np.int64),
            "doc_index": rng.integers(0, N // 4, B).astype(np.int64)}


def _corpus(rng) -> dict:
    lengths = rng.integers(3, C + 1, N).astype(np.int32)
    tokens = np.where(np.arange(C) < lengths[:, None], rng.integers(4, VOCAB, (N, C)), 0)
    return {"embeddings": rng.normal(size=(N, 16)).astype(np.float32),
            "tokens": tokens.astype(np.int32), "lengths": lengths,
            "doc_index": (np.arange(N) // 4).astype(np.int32)}


def _candidates(ids: np.ndarray, valid: np.ndarray, corpus: dict) -> dict:
    """What the host retriever attaches to a batch: candidates `ids` [B, K] (-1: the null
    document or an empty slot), their tokens and lengths."""
    ids = np.where(valid, ids, -1)
    real = ids >= 0
    tokens = np.where(real[..., None], corpus["tokens"][np.maximum(ids, 0)], 0)
    lengths = np.where(real, corpus["lengths"][np.maximum(ids, 0)], 0)
    return {"cand_ids": ids.astype(np.int32), "cand_valid": valid,
            "cand_tokens": tokens.astype(np.int32), "cand_lengths": lengths.astype(np.int32)}


def _random_candidates(rng, corpus: dict) -> dict:
    """The null document first, K-1 blocks, the last slot empty in some rows."""
    ids = np.concatenate([np.full((B, 1), -1), rng.integers(0, NUM_VALID, (B, K - 1))], axis=1)
    valid = np.ones((B, K), bool)
    valid[::3, -1] = False
    return _candidates(ids, valid, corpus)


class Step:
    """The loss and gradients of RealmLossFn, jitted for one mesh and retrieval mode, with
    the parameters placed on their shardings (compiled once, called on several batches)."""

    def __init__(self, models, mode: str, mesh):
        configs, host_params = models
        self.mesh, self.rules = mesh, sharding.DEFAULT_RULES
        p_shardings = sharding.part_shardings(configs, mesh, self.rules)
        self.params = sharding.place(host_params, p_shardings)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        self.corpus_sharding = None
        if mode == "device":
            rows = corpus_sharding(mesh, self.rules).spec[0]
            self.corpus_sharding = NamedSharding(mesh, PartitionSpec(rows))
        loss_fn = realm.RealmLossFn(configs, SPECIAL, K, exclude_slack=4, score_scale=1.0,
                                    mode=mode, num_valid=NUM_VALID, block_size=8,
                                    exclude="document")
        corpus_shardings = None if mode == "scann" else self.corpus_sharding
        self._fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(
            p_shardings, self.batch_sharding, corpus_shardings,
            NamedSharding(mesh, PartitionSpec())), compiler_options=FAST)

    def __call__(self, batch: dict, corpus: dict | None = None):
        """(loss, metrics, candidate ids, grads) as host arrays."""
        batch = {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()}
        if corpus is not None:
            corpus = {k: jax.device_put(v, self.corpus_sharding) for k, v in corpus.items()}
        with sharding.activate(self.mesh, self.rules):
            (loss, (metrics, cand_ids)), grads = self._fn(self.params, batch, corpus,
                                                          jax.random.key(0))
        return jax.device_get((loss, metrics, cand_ids, grads))


def _assert_sharded(params, axis: str):
    """The parameters really are split over the mesh axis under test."""
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(params)]
    assert any(axis in jax.tree.leaves(tuple(s)) for s in specs), (axis, specs[:5])


def _assert_same(got, want, name: str):
    loss, metrics, _, grads = got
    loss1, metrics1, _, grads1 = want
    np.testing.assert_allclose(loss, loss1, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics["retrieval_utility"], metrics1["retrieval_utility"],
                               rtol=1e-4, atol=1e-6, err_msg=name)
    # Summation orders differ between layouts: the tolerance is relative to the part's
    # largest gradient (entries near zero carry its rounding noise).
    for part in realm.PARTS:
        scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1[part]))
        assert scale > 0, part  # gradients reach both towers and the reader
        for (path, g), g1 in zip(jax.tree_util.tree_leaves_with_path(grads[part]),
                                 jax.tree.leaves(grads1[part])):
            np.testing.assert_allclose(g, g1, rtol=1e-3, atol=5e-4 * scale,
                                       err_msg=f"{name} {part}{jax.tree_util.keystr(path)}")


def test_loss_and_grads_sharded_match_one_device(models):
    rng = np.random.default_rng(0)
    batch = _query_batch(rng)
    corpus = _corpus(rng)
    scann_batch = dict(batch, **_random_candidates(rng, corpus))
    one = Step(models, "scann", sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    want = one(scann_batch)
    assert np.isfinite(want[0]) and want[1]["masked_tokens"] == batch["mask_valid"].sum()
    assert abs(want[1]["retrieval_utility"]) > 1e-2  # the reader cares what it reads

    # scann mode (candidates in the batch): data x fsdp and data x tensor.
    for name, shape in MESHES.items():
        step = Step(models, "scann", sharding.make_mesh(shape))
        _assert_sharded(step.params, {"data_x_fsdp": "fsdp", "data_x_tensor": "tensor"}[name])
        _assert_same(step(scann_batch), want, f"scann {name}")

    # device mode: the step searches the corpus (sharded over all 8 devices) with the live
    # query tower, drops the source document, gathers the candidates' tokens; its loss and
    # gradients are those of one device given the same candidates.
    got = Step(models, "device", sharding.make_mesh(MESHES["data_x_tensor"]))(batch, corpus)
    cand = got[2]
    assert (cand[:, 0] == -1).all() and ((cand[:, 1:] >= 0) & (cand[:, 1:] < NUM_VALID)).all()
    assert (corpus["doc_index"][cand[:, 1:]] != batch["doc_index"][:, None]).all()
    found = dict(batch, **_candidates(cand, np.ones((B, K), bool), corpus))
    _assert_same(got, one(found), "device data_x_tensor")
