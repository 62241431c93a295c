"""Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): the gradient of a contrastive loss over a large batch, with the
encoders' activations kept for one chunk at a time.

The loss depends on the parameters only through the embeddings, so by the chain rule

    dL/dtheta = sum over rows r of (dL/de_r) . (de_r/dtheta).

1. Embed all queries and contexts chunk by chunk, without gradients (only the [B, P]
   embeddings are kept).
2. Take the loss and its gradient with respect to the embeddings (cheap: [B, P] arrays).
3. For each chunk, run the encoder again under ``jax.vjp`` and pull the chunk's cached
   embedding gradient back to the parameters; sum over chunks.

Peak activation memory is that of one chunk; the cost is one extra forward pass. The result
equals ``jax.value_and_grad`` of the whole batch up to float rounding. Everything is
traceable (``jax.lax.map`` / ``jax.lax.scan`` over chunks), so it runs inside ``jax.jit``.

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


def _embed_all(embed: EmbedFn, params: Any, chunks: Any, count: int, rng: Array | None
               ) -> Array:
    """Embeddings [n, P] of every chunk, without gradients."""
    def one(args):
        index, inputs = args
        if rng is None:
            return embed(params, inputs)
        return embed(params, inputs, jax.random.fold_in(rng, index))

    out = jax.lax.map(one, (jnp.arange(count), chunks))
    return jax.lax.stop_gradient(_from_chunks(out))


def _pull_back(embed: EmbedFn, params: Any, chunks: Any, count: int, cotangents: Array,
               rng: Array | None, grads: Any) -> Any:
    """grads + sum over chunks of (d embed(chunk) / d params)^T cotangents[chunk]."""
    cotangents = _to_chunks(cotangents, count)

    def step(acc, args):
        index, inputs, cotangent = args
        call = ((lambda p: embed(p, inputs)) if rng is None
                else (lambda p: embed(p, inputs, jax.random.fold_in(rng, index))))
        out, vjp = jax.vjp(call, params)
        (g,) = vjp(cotangent.astype(out.dtype))
        return jax.tree.map(jnp.add, acc, g), None

    grads, _ = jax.lax.scan(step, grads, (jnp.arange(count), chunks, cotangents))
    return grads


def grad_cache_value_and_grad(embed_q: EmbedFn, embed_c: EmbedFn,
                              loss_on_embeddings: Callable[..., Any], params: Any,
                              queries: Any, contexts: Any, chunk_size: int, *,
                              has_aux: bool = False, rng: Array | None = None
                              ) -> tuple[Any, Any]:
    """``jax.value_and_grad`` of ``loss_on_embeddings(embed_q(params, queries),
    embed_c(params, contexts))`` with respect to ``params``, computed chunk by chunk.

    Args:
      embed_q, embed_c: ``(params, inputs) -> [n, P]`` float embeddings (``(params, inputs,
        rng)`` when ``rng`` is given); each reads its own tower from ``params`` (the same
        function twice for shared towers).
      loss_on_embeddings: ``(query_embeddings [B, P], context_embeddings [N, P]) -> loss``,
        or ``(loss, aux)`` with ``has_aux``.
      params: the parameter pytree the gradients are taken for.
      queries, contexts: pytrees of arrays with leading sizes B and N (e.g. dicts of
        ``input_ids``, ``attention_mask``).
      chunk_size: rows embedded at once; must divide B and N.
      rng: optional key for dropout (see the module docstring).

    Returns:
      ``(loss, grads)``, or ``((loss, aux), grads)`` with ``has_aux``, as
      ``jax.value_and_grad``.
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
