"""Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): the gradient of a contrastive loss over a large batch, with the
encoders' activations kept for one chunk at a time.

The loss depends on the parameters only through the embeddings, so by the chain rule
dL/dtheta = sum over rows r of (dL/de_r) . (de_r/dtheta):

1. embed all queries and contexts chunk by chunk, without gradients (keeping [B, P]);
2. take the loss and its gradient with respect to the embeddings (cheap);
3. for each chunk, run the encoder again under ``jax.vjp`` and pull the chunk's embedding
   gradient back to the parameters; sum over chunks.

Peak activation memory is one chunk's, for one extra forward pass; the result equals
``jax.value_and_grad`` of the whole batch up to float rounding, and it all traces under
``jax.jit`` (``lax.map`` / ``lax.scan`` over chunks).

Chunks are strided (chunk c holds rows c, c + n/chunk_size, ...): with the batch sharded in
contiguous blocks along the data axis, every chunk then holds the same number of rows of
every device's block, so all devices work on every chunk with their own rows (no gather);
only the loss on the embeddings sees the global batch.

With dropout, pass ``rng``: chunk c of the queries (contexts) is embedded with
``fold_in(fold_in(rng, 0 (1)), c)`` in both passes, so the recomputation sees the same masks.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
EmbedFn = Callable[..., Array]  # (params, inputs[, rng]) -> [n, P]


def _chunks(inputs: Any, chunk_size: int, what: str) -> tuple[Any, int]:
    """Leaves [n, ...] -> [n / chunk_size, chunk_size, ...], chunk c holding rows c,
    c + n / chunk_size, c + 2 n / chunk_size, ...; n must be a multiple of chunk_size."""
    sizes = {x.shape[0] for x in jax.tree.leaves(inputs)}
    if len(sizes) != 1:
        raise ValueError(f"grad cache: the {what} arrays have different leading sizes {sizes}")
    n = sizes.pop()
    if chunk_size < 1 or n % chunk_size:
        raise ValueError(f"grad cache: chunk_size {chunk_size} must divide the number of "
                         f"{what} ({n})")
    return jax.tree.map(lambda x: _to_chunks(x, n // chunk_size), inputs), n // chunk_size


def _to_chunks(x: Array, count: int) -> Array:
    return x.reshape(-1, count, *x.shape[1:]).swapaxes(0, 1)


def _from_chunks(x: Array) -> Array:
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _embed_chunk(embed: EmbedFn, inputs: Any, rng: Array | None, index: Array
                 ) -> Callable[[Any], Array]:
    """params -> the embeddings of chunk `index`, its dropout key fold_in(rng, index)."""
    if rng is None:
        return lambda params: embed(params, inputs)
    return lambda params: embed(params, inputs, jax.random.fold_in(rng, index))


def _embed_all(embed: EmbedFn, params: Any, chunks: Any, count: int, rng: Array | None
               ) -> Array:
    """Embeddings [n, P] of every chunk, without gradients."""
    def one(args):
        index, inputs = args
        return _embed_chunk(embed, inputs, rng, index)(params)

    out = jax.lax.map(one, (jnp.arange(count), chunks))
    return jax.lax.stop_gradient(_from_chunks(out))


def _pull_back(embed: EmbedFn, params: Any, chunks: Any, count: int, cotangents: Array,
               rng: Array | None, grads: Any) -> Any:
    """grads + sum over chunks of (d embed(chunk) / d params)^T cotangents[chunk]."""
    def step(acc, args):
        index, inputs, cotangent = args
        out, vjp = jax.vjp(_embed_chunk(embed, inputs, rng, index), params)
        (g,) = vjp(cotangent.astype(out.dtype))
        return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(step, grads,
                            (jnp.arange(count), chunks, _to_chunks(cotangents, count)))
    return grads


def grad_cache_value_and_grad(embed_q: EmbedFn, embed_c: EmbedFn,
                              loss_on_embeddings: Callable[..., Any], params: Any,
                              queries: Any, contexts: Any, chunk_size: int, *,
                              has_aux: bool = False, rng: Array | None = None
                              ) -> tuple[Any, Any]:
    """``jax.value_and_grad`` of ``loss_on_embeddings(embed_q(params, queries),
    embed_c(params, contexts))`` with respect to ``params`` (``(loss, grads)``, or
    ``((loss, aux), grads)`` with ``has_aux``), computed chunk by chunk.

    embed_q, embed_c: ``(params, inputs) -> [n, P]`` float embeddings (``(params, inputs,
    rng)`` when ``rng`` is given, for dropout); each reads its own tower from ``params`` (the
    same function twice for shared towers). loss_on_embeddings: ``(query_embeddings [B, P],
    context_embeddings [N, P]) -> loss`` (or ``(loss, aux)``). queries, contexts: pytrees of
    arrays with leading sizes B and N, which ``chunk_size`` must divide.
    """
    q_chunks, q_count = _chunks(queries, chunk_size, "queries")
    c_chunks, c_count = _chunks(contexts, chunk_size, "contexts")
    q_rng = None if rng is None else jax.random.fold_in(rng, 0)
    c_rng = None if rng is None else jax.random.fold_in(rng, 1)
    q_emb = _embed_all(embed_q, params, q_chunks, q_count, q_rng)
    c_emb = _embed_all(embed_c, params, c_chunks, c_count, c_rng)
    value, (q_grad, c_grad) = jax.value_and_grad(loss_on_embeddings, argnums=(0, 1),
                                                 has_aux=has_aux)(q_emb, c_emb)
    grads = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
    grads = _pull_back(embed_q, params, q_chunks, q_count, q_grad, q_rng, grads)
    grads = _pull_back(embed_c, params, c_chunks, c_count, c_grad, c_rng, grads)
    return value, grads
