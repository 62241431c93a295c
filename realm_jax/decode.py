"""RAG decoding: greedy, sampling and RAG-Token beam search, RAG-Sequence thorough and fast
decoding.

Everything is jitted and batched over questions; the time loop is a `lax.while_loop` over
BART's incremental-decoding cache (realm_jax/models/bart.py). Shapes: B questions, K
documents, N beams, M = max_length, V vocabulary entries.

- RAG-Token (`rag_token_generate`): the next-token distribution is the document-
  marginalized log sum_z p(z|x) p(v|x, z, y<t); the encoder states of all K documents are
  kept (B * N * K decoder rows), and the cache follows the beams. num_beams=1 is greedy;
  do_sample=True draws num_return_sequences samples per question instead (`sample_search`:
  temperature, top-k, top-p), from a jax.random key.
- RAG-Sequence (`rag_sequence_generate`): beam search per (question, document); the
  K * N hypotheses of a question are pooled (duplicates dropped) and scored by
  log sum_z p(z|x) p(y|x, z). Thorough decoding (transformers') rescores every hypothesis
  under every document with a teacher-forced pass; fast decoding (fast=True) runs no extra
  pass and counts p(y|x, z) as 0 for a document whose beam did not produce y.

The search follows transformers' `generate` with the same settings (`GenerationConfig`):
decoding starts from `decoder_start_token_id`; its logits processors (`_process`), then for
sampling its warpers (`_warp`), apply in its order; `beam_search` is its beam search step
for step. RAG-Sequence scores hypotheses as transformers' RagSequenceForGeneration does
(labels = the hypothesis, the first target dropped when every hypothesis of the question
starts with bos, pads masked), except that the document prior always counts (see
realm_jax/objectives/rag.py), and that its candidate beams are generated with the contexts'
attention mask, which transformers leaves out (see `rag_sequence_generate`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from realm_jax.models.bart import Bart, init_cache, reorder_cache
from realm_jax.models.layers import Replaceable
from realm_jax.models.rag import Rag, RagConfig, check_contexts
from realm_jax.objectives.rag import doc_log_probs, marginalize_token_logprobs, scored_positions
from realm_jax.objectives.realm import target_log_probs

Array = jax.Array

# transformers' "very large negative" for hypotheses out of the running (added, not set).
NEG = -1.0e9

__all__ = ["GenerationConfig", "Generated", "Hypotheses", "beam_search", "greedy_search",
           "rag_sequence_generate", "rag_token_generate", "sample_search", "trim"]


@dataclasses.dataclass(frozen=True)
class GenerationConfig(Replaceable):
    """Decoding settings, as in transformers' GenerationConfig (same names and defaults;
    BART's token ids). `GenerationConfig.from_rag(cfg)` takes the token ids from a RAG
    model's config."""
    max_length: int = 20
    min_length: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    decoder_start_token_id: int = 2
    bos_token_id: int | None = 0
    eos_token_id: int = 2
    pad_token_id: int = 1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self):
        for broken, rule in [
                (self.max_length < 2, "max_length must be >= 2 (the start token and one more)"),
                (self.num_beams < 1, "num_beams must be >= 1"),
                (self.num_return_sequences < 1, "num_return_sequences must be >= 1"),
                (self.early_stopping not in (True, False, "never"),
                 "early_stopping must be True, False or 'never'"),
                (not self.temperature > 0, "temperature must be > 0 (top_k=1 samples greedily)"),
                (self.top_k < 0 or not 0 < self.top_p <= 1,
                 "top_k must be >= 0 (0: off) and top_p in (0, 1]"),
                (self.do_sample and self.num_beams != 1, "do_sample draws num_return_sequences "
                 "samples with num_beams=1 (beam sampling is not implemented)")]:
            if broken:
                raise ValueError(f"{rule}, got {self}")

    @classmethod
    def from_rag(cls, config: RagConfig, **settings) -> "GenerationConfig":
        """Token ids from the RAG config's generator (and its forced bos/eos); any field
        may be given in `settings`."""
        g = config.generator
        ids = dict(decoder_start_token_id=g.decoder_start_token_id, bos_token_id=g.bos_token_id,
                   eos_token_id=g.eos_token_id, pad_token_id=g.pad_token_id,
                   forced_bos_token_id=config.forced_bos_token_id,
                   forced_eos_token_id=config.forced_eos_token_id)
        return cls(**(ids | settings))

    @property
    def fill_token_id(self) -> int:
        """What fills a beam hypothesis after its end (transformers: pad, or eos if pad is 0)."""
        return self.pad_token_id if self.pad_token_id else self.eos_token_id


class Generated(NamedTuple):
    """Decoded sequences: the decoder start token, the generated tokens, then fill."""
    sequences: Array   # [B, R, max_length] int32
    scores: Array      # [B, R] float32 (beam: length-penalized; greedy: sum of log-probs;
                       # RAG-Sequence: log p(y|x))
    lengths: Array     # [B, R] int32: positions used, the start token included


class Hypotheses(NamedTuple):
    """What a search returns for each of its B items: N hypotheses, best first."""
    sequences: Array         # [B, N, M] int32
    scores: Array            # [B, N] float32
    lengths: Array           # [B, N] int32
    token_logprobs: Array    # [B, N, M] float32: log p(token t | prefix), unprocessed (0 at t=0)


# A decoding step: (state, tokens [rows]) -> (next-token logits [rows, V], state).
StepFn = Callable[[Any, Array], tuple[Array, Any]]
# (state, source rows [rows]) -> state: row r continues row source[r].
ReorderFn = Callable[[Any, Array], Any]


def trim(generated: Generated) -> np.ndarray:
    """[B * R, L] numpy: the sequences cut to the longest one, as transformers returns them."""
    seqs = np.asarray(generated.sequences)
    length = int(np.max(np.asarray(generated.lengths)))
    return seqs.reshape(-1, seqs.shape[-1])[:, :length]


def _process(scores: Array, cur_len: Array, gen: GenerationConfig) -> Array:
    """transformers' logits processors, in its order: min_length (eos barred while shorter),
    forced bos (at the first step), forced eos (at the last, max_length - 1); `cur_len`
    counts the tokens so far, the start token included."""
    vocab = jnp.arange(scores.shape[-1])
    if gen.min_length > 0:
        scores = jnp.where((cur_len < gen.min_length) & (vocab == gen.eos_token_id), -jnp.inf,
                           scores)

    def force(scores, token, when):
        return jnp.where(when, jnp.where(vocab == token, 0.0, -jnp.inf), scores)

    if gen.forced_bos_token_id is not None:
        scores = force(scores, gen.forced_bos_token_id, cur_len == 1)
    if gen.forced_eos_token_id is not None:
        scores = force(scores, gen.forced_eos_token_id, cur_len == gen.max_length - 1)
    return scores


def _set_column(x: Array, t: Array, value: Array) -> Array:
    """x[..., t] = value (t traced)."""
    return jnp.where(jnp.arange(x.shape[-1]) == t, value[..., None], x)


def _take(x: Array, idx: Array) -> Array:
    """x [B, n, ...] gathered along axis 1 by idx [B, m]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _warp(scores: Array, gen: GenerationConfig) -> Array:
    """transformers' sampling warpers, in its order: temperature; top-k (scores below the
    k-th best become -inf; ties with it stay); top-p (the smallest set of best tokens whose
    probability reaches top_p: a token goes when the tokens less likely than or as likely as
    it hold at most 1 - top_p, the best token always stays)."""
    if gen.temperature != 1.0:
        scores = scores / gen.temperature
    if gen.top_k:
        kth = lax.top_k(scores, min(gen.top_k, scores.shape[-1]))[0][..., -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if gen.top_p < 1.0:
        ascending = jnp.sort(scores, axis=-1)
        dropped = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1 - gen.top_p
        dropped = dropped.at[..., -1].set(False)
        # the dropped tokens are a prefix of the ascending order: keep from the first kept
        first_kept = jnp.take_along_axis(ascending, jnp.argmin(dropped, axis=-1)[..., None],
                                         axis=-1)
        scores = jnp.where(scores < first_kept, -jnp.inf, scores)
    return scores


def greedy_search(step: StepFn, state: Any, batch_size: int, gen: GenerationConfig
                  ) -> Hypotheses:
    """Greedy decoding of `batch_size` sequences (N = 1): the argmax of the processed logits
    (finishing as `_one_by_one`)."""
    return _one_by_one(step, state, batch_size, gen,
                       lambda scores, cur_len: jnp.argmax(scores, axis=-1))


def sample_search(step: StepFn, state: Any, batch_size: int, gen: GenerationConfig,
                  rng: Array) -> Hypotheses:
    """Sampling of `batch_size` sequences (N = 1), each row on its own: the next token is
    drawn from the processed logits warped by `_warp` (temperature, top-k, top-p), with the
    key fold_in(rng, t) at step t (finishing as `_one_by_one`). Scores: the sum of the
    unwarped log-probs of the tokens drawn. top_k=1 is greedy decoding at any temperature."""
    def draw(scores, cur_len):
        return jax.random.categorical(jax.random.fold_in(rng, cur_len), _warp(scores, gen),
                                      axis=-1)

    return _one_by_one(step, state, batch_size, gen, draw)


def _one_by_one(step: StepFn, state: Any, batch_size: int, gen: GenerationConfig,
                choose: Callable[[Array, Array], Array]) -> Hypotheses:
    """One hypothesis per row, the next token picked by `choose(processed scores [rows, V],
    cur_len)`; finished rows continue with pad; stops when all have produced eos or at
    max_length."""
    m, start = gen.max_length, gen.decoder_start_token_id
    seqs = jnp.full((batch_size, m), gen.pad_token_id, jnp.int32).at[:, 0].set(start)
    init = dict(cur_len=jnp.int32(1), seqs=seqs, tlp=jnp.zeros((batch_size, m), jnp.float32),
                score=jnp.zeros((batch_size,), jnp.float32),
                length=jnp.ones((batch_size,), jnp.int32),
                unfinished=jnp.ones((batch_size,), bool), state=state)

    def cond(c):
        return (c["cur_len"] < m) & jnp.any(c["unfinished"])

    def body(c):
        cur_len, live = c["cur_len"], c["unfinished"]
        tokens = jnp.take(c["seqs"], cur_len - 1, axis=1)
        logits, state = step(c["state"], tokens)
        logits = logits.astype(jnp.float32)
        nxt = choose(_process(logits, cur_len, gen), cur_len).astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[:, None], axis=-1)[:, 0]
        nxt = jnp.where(live, nxt, gen.pad_token_id)
        lp = jnp.where(live, lp, 0.0)
        done = (nxt == gen.eos_token_id) | (cur_len + 1 >= m)
        return dict(cur_len=cur_len + 1, seqs=_set_column(c["seqs"], cur_len, nxt),
                    tlp=_set_column(c["tlp"], cur_len, lp), score=c["score"] + lp,
                    length=jnp.where(live, cur_len + 1, c["length"]),
                    unfinished=live & ~done, state=state)

    c = lax.while_loop(cond, body, init)
    return Hypotheses(c["seqs"][:, None], c["score"][:, None], c["length"][:, None],
                      c["tlp"][:, None])


def beam_search(step: StepFn, state: Any, reorder: ReorderFn, batch_size: int,
                gen: GenerationConfig) -> Hypotheses:
    """Beam search over `batch_size` items of `gen.num_beams` beams each (decoder rows
    item-major: row b * N + n), transformers' algorithm step for step: the top 2N
    continuations of all beams; those ending in eos (or reaching max_length) among the top
    N become finished hypotheses, scored sum log p / generated_length ** length_penalty,
    the best N kept; the best N unfinished continue (`reorder` moves the state with them).
    Stops when no item can improve (or, with early_stopping=True, when all have N
    finished hypotheses), or at max_length."""
    b, n, m = batch_size, gen.num_beams, gen.max_length
    k2 = 2 * n                                    # (one eos token + 1) * num_beams
    lp_exp = gen.length_penalty
    # length ** length_penalty for every length, computed as Python does (then float32)
    penalty = jnp.asarray(np.array([max(t, 1) ** lp_exp for t in range(m + 1)], np.float64),
                          jnp.float32)
    early = gen.early_stopping

    running = jnp.full((b, n, m), gen.fill_token_id, jnp.int32)
    running = running.at[:, :, 0].set(gen.decoder_start_token_id)
    init = dict(
        cur_len=jnp.int32(1), running=running,
        running_scores=jnp.zeros((b, n), jnp.float32).at[:, 1:].set(NEG),
        running_tlp=jnp.zeros((b, n, m), jnp.float32),
        seqs=running, scores=jnp.full((b, n), NEG, jnp.float32),
        tlp=jnp.zeros((b, n, m), jnp.float32), lengths=jnp.ones((b, n), jnp.int32),
        finished=jnp.zeros((b, n), bool), unsatisfied=jnp.ones((b, 1), bool),
        go=jnp.bool_(True), state=state)

    def body(c):
        cur_len = c["cur_len"]
        tokens = jnp.take(c["running"], cur_len - 1, axis=2).reshape(b * n)
        logits, state = step(c["state"], tokens)
        raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)          # [B*N, V]
        vocab = raw.shape[-1]
        lp = _process(raw, cur_len, gen).reshape(b, n, vocab) + c["running_scores"][:, :, None]
        topk_lp, idx = lax.top_k(lp.reshape(b, n * vocab), k2)                  # [B, 2N]
        src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        tok_raw = jnp.take_along_axis(raw.reshape(b, n * vocab), idx, axis=1)
        topk_seqs = _set_column(_take(c["running"], src), cur_len, tok)         # [B, 2N, M]
        topk_tlp = _set_column(_take(c["running_tlp"], src), cur_len, tok_raw)
        hits = (tok == gen.eos_token_id) | (cur_len + 1 >= m)

        # the best N unfinished continue
        run_lp = topk_lp + hits.astype(jnp.float32) * NEG
        _, keep = lax.top_k(run_lp, n)
        running, running_scores = _take(topk_seqs, keep), _take(run_lp, keep)
        running_tlp, source = _take(topk_tlp, keep), _take(src, keep)

        # finished ones among the top N join the best N finished hypotheses
        just_done = hits & (jnp.arange(k2) < n)[None, :]
        fin = topk_lp / penalty[cur_len]
        if early is True:
            fin = fin + jnp.all(c["finished"], axis=-1, keepdims=True).astype(jnp.float32) * NEG
        fin = fin + (~c["unsatisfied"]).astype(jnp.float32) * NEG
        fin = fin + (~just_done).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([c["scores"], fin], axis=1)
        _, best = lax.top_k(merged_scores, n)

        def merge(old, new):
            return _take(jnp.concatenate([old, new], axis=1), best)

        seqs, tlp = merge(c["seqs"], topk_seqs), merge(c["tlp"], topk_tlp)
        lengths = merge(c["lengths"], jnp.full((b, k2), cur_len + 1, jnp.int32))
        finished = merge(c["finished"], just_done)
        scores = _take(merged_scores, best)

        rows = (source + jnp.arange(b, dtype=source.dtype)[:, None] * n).reshape(b * n)
        state = reorder(state, rows)
        cur_len = cur_len + 1

        # can the running beams still beat the worst finished hypothesis?
        best_len = jnp.int32(m - 1) if early == "never" and lp_exp > 0.0 else cur_len - 1
        best_possible = running_scores[:, :1] / penalty[best_len]
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        unsatisfied = c["unsatisfied"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
        go = jnp.any(unsatisfied) & ~jnp.all(hits)
        if early is True:
            go = go & ~jnp.all(finished)
        return dict(cur_len=cur_len, running=running, running_scores=running_scores,
                    running_tlp=running_tlp, seqs=seqs, scores=scores, tlp=tlp,
                    lengths=lengths, finished=finished, unsatisfied=unsatisfied, go=go,
                    state=state)

    c = lax.while_loop(lambda c: c["go"] & (c["cur_len"] < m), body, init)
    return Hypotheses(c["seqs"], c["scores"], c["lengths"], c["tlp"])


def _search(step: StepFn, state: Any, reorder: ReorderFn, batch_size: int,
            gen: GenerationConfig) -> Hypotheses:
    """Greedy decoding for one beam (as transformers' `generate`), else beam search."""
    if gen.num_beams == 1:
        return greedy_search(step, state, batch_size, gen)
    return beam_search(step, state, reorder, batch_size, gen)


# ---------------------------------------------------------------------------------------
# The BART generator inside the loops


def _encoded(params: Any, context_ids: Array, context_mask: Array | None, doc_scores: Array,
             config: RagConfig) -> tuple[Bart, Any, Array, Array]:
    """(BART, its params, encoder states [B * K, L, D] of the contexts, their mask
    [B * K, L]), the shapes checked."""
    context_mask = check_contexts(context_ids, context_mask, doc_scores)
    states = config.module().apply({"params": params}, context_ids, context_mask,
                                   method=Rag.encode_contexts)
    return (config.generator.module(), params["generator"], states,
            context_mask.reshape(states.shape[:2]))


def _expand(x: Array, b: int, n: int) -> Array:
    """[B * K, ...] -> [B * N * K, ...]: every beam of a question gets its K documents."""
    return jnp.repeat(x.reshape((b, -1) + x.shape[1:]), n, axis=0).reshape((-1,) + x.shape[1:])


_CONTEXT = ("context_key", "context_value")


def _decoder(bart: Bart, params: Any, states: Array, mask: Array, copies: int,
             max_steps: int) -> tuple[StepFn, Any]:
    """A cached BART step over rows = tokens repeated `copies` times each, and its
    initial state: the decoder cache without the cross-attention keys/values. Those are
    projected once here and held outside the loop (constant across steps), so that the
    loop neither carries nor copies them: inside the step they are put back with their
    "ready" flag a constant, which lets XLA drop the cache's conditional."""
    cfg = bart.config
    cache = init_cache(cfg, states.shape[0], max_steps, states.shape[1])
    dummy = jnp.zeros((states.shape[0], 1), jnp.int32)
    _, primed = bart.apply({"params": params, "cache": cache}, dummy, states, mask,
                           decode=True, method=Bart.decode, mutable=["cache"])
    primed = traverse_util.flatten_dict(primed["cache"])
    context = {k: v for k, v in primed.items() if k[-1] in _CONTEXT}
    ready = [k for k in primed if k[-1] == "context_ready"]
    state = {k: v for k, v in traverse_util.flatten_dict(cache).items()
             if k not in context and k[-1] != "context_ready"}

    def step(state, tokens):
        ids = jnp.repeat(tokens.astype(jnp.int32), copies)[:, None]
        full = {**state, **context, **{k: jnp.ones((), bool) for k in ready}}
        logits, v = bart.apply({"params": params, "cache": traverse_util.unflatten_dict(full)},
                               ids, states, mask, decode=True, method=Bart.decode,
                               mutable=["cache"])
        new = traverse_util.flatten_dict(v["cache"])
        return logits[:, 0], {k: new[k] for k in state}

    return step, state


@functools.partial(jax.jit, static_argnames=("config", "gen"))
def rag_token_generate(params: Any, context_ids: Array, context_mask: Array | None,
                       doc_scores: Array, *, config: RagConfig, gen: GenerationConfig,
                       rng: Array | None = None) -> Generated:
    """RAG-Token decoding: beam search (greedy for num_beams=1) over the document-
    marginalized next-token distribution, as transformers' RagTokenForGeneration.generate
    given the same contexts and scores; or, with gen.do_sample, `sample_search` from that
    distribution, seeded by `rng` (a jax.random key).

    params: the `Rag` params (only "generator" is read). context_ids/mask: [B, K, L].
    doc_scores: [B, K] (e.g. `Rag.doc_scores`). Returns `Generated` with R =
    gen.num_return_sequences sequences per question (best first for beam search;
    independent samples, in no order, when sampling)."""
    bart, gp, states, flat_mask = _encoded(params, context_ids, context_mask, doc_scores, config)
    b, k = context_ids.shape[:2]
    r = gen.num_return_sequences
    n = r if gen.do_sample else gen.num_beams        # decoder rows per question
    if gen.do_sample and rng is None:
        raise ValueError("do_sample needs rng, a jax.random key")
    if r > n:
        raise ValueError(f"num_return_sequences {r} > num_beams {n}")
    states, flat_mask = _expand(states, b, n), _expand(flat_mask, b, n)
    scores = jnp.repeat(doc_scores.astype(jnp.float32), n, axis=0)             # [B*N, K]
    decoder, cache = _decoder(bart, gp, states, flat_mask, k, gen.max_length - 1)

    def step(cache, tokens):
        logits, cache = decoder(cache, tokens)
        return marginalize_token_logprobs(logits.reshape(b * n, k, -1), scores), cache

    def reorder(cache, rows):
        return reorder_cache(cache, (rows[:, None] * k + jnp.arange(k)).reshape(-1))

    if gen.do_sample:
        hyps = sample_search(step, cache, b * n, gen, rng)
        return Generated(hyps.sequences.reshape(b, n, -1), hyps.scores.reshape(b, n),
                         hyps.lengths.reshape(b, n))
    hyps = _search(step, cache, reorder, b, gen)
    return Generated(hyps.sequences[:, :r], hyps.scores[:, :r], hyps.lengths[:, :r])


def _rescore(bart: Bart, params: Any, states: Array, mask: Array, candidates: Array,
             k: int) -> Array:
    """log p(hypothesis token t | document k) by a teacher-forced pass of every candidate
    [B, C, M] under every document: [B, C, K, M - 1] (the target of position t is token
    t + 1). One candidate per question at a time, over all B * K contexts."""
    b, c, m = candidates.shape

    def one(seq):                                            # seq [B, M]
        dec = jnp.repeat(seq[:, :-1], k, axis=0)             # [B*K, M-1]
        logits = bart.apply({"params": params}, dec, states, mask, method=Bart.decode)
        lp = target_log_probs(logits, jnp.repeat(seq[:, 1:], k, axis=0))
        return lp.reshape(b, k, m - 1)

    out = lax.map(one, jnp.swapaxes(candidates, 0, 1))       # [C, B, K, M-1]
    return jnp.transpose(out, (1, 0, 2, 3))


@functools.partial(jax.jit, static_argnames=("config", "gen", "fast", "deduplicate"))
def rag_sequence_generate(params: Any, context_ids: Array, context_mask: Array | None,
                          doc_scores: Array, *, config: RagConfig, gen: GenerationConfig,
                          fast: bool = False, deduplicate: bool = True) -> Generated:
    """RAG-Sequence decoding (see the module docstring): the K * N hypotheses of a question
    pooled (`deduplicate`: identical ones counted once), the gen.num_return_sequences best
    by log p(y|x) = logsumexp_z(log p(z|x) + log p(y|x, z)) returned.

    Both the per-document beam search and the rescoring pass see the contexts through
    `context_mask`: a hypothesis never attends to a context's padding. This differs from
    transformers on purpose: RagSequenceForGeneration.generate runs its beam search with
    attention_mask=None, and `generate` infers no mask for an encoder-decoder, so its
    candidates attend to the padding of padded contexts (its rescoring pass uses the mask). With
    padded contexts the pooled candidates, and so the answers, can differ from transformers';
    without padding, or where the padding changes no beam, they are the same.

    Scores: log p(y|x) as estimated ([B, R] float32); -inf for a slot with no hypothesis
    left (R larger than the number of distinct hypotheses)."""
    if gen.do_sample:
        raise ValueError("do_sample: sampling is implemented for RAG-Token decoding "
                         "(rag_token_generate), not RAG-Sequence")
    bart, gp, states, flat_mask = _encoded(params, context_ids, context_mask, doc_scores, config)
    b, k = context_ids.shape[:2]
    n, r = gen.num_beams, gen.num_return_sequences
    c, m = k * n, gen.max_length
    if r > c:
        raise ValueError(f"num_return_sequences {r} > documents x beams {c}")
    beam_states = jnp.repeat(states, n, axis=0)                                # [B*K*N, ...]
    beam_mask = jnp.repeat(flat_mask, n, axis=0)
    step, cache = _decoder(bart, gp, beam_states, beam_mask, 1, m - 1)
    hyps = _search(step, cache, reorder_cache, b * k, gen)

    candidates = hyps.sequences.reshape(b, c, m)                               # doc-major
    lengths = hyps.lengths.reshape(b, c)
    targets = candidates[:, :, 1:]
    same = jnp.all(candidates[:, :, None, :] == candidates[:, None, :, :], axis=-1)  # [B,C,C]
    if fast:
        by_doc = candidates.reshape(b, k, n, m)
        match = jnp.all(candidates[:, :, None, None, :] == by_doc[:, None], axis=-1)  # [B,C,K,N]
        present = jnp.any(match, axis=-1)                                       # [B, C, K]
        which = jnp.argmax(match, axis=-1)
        tlp = hyps.token_logprobs.reshape(b, k, n, m)[..., 1:]
        tok_lp = jnp.take_along_axis(tlp[:, None], which[..., None, None], axis=3)[:, :, :, 0]
    else:
        tok_lp = _rescore(bart, gp, states, flat_mask, candidates, k)          # [B, C, K, M-1]
        present = None
    # transformers' exclude_bos_score=True, its all-bos check per question (over its C rows)
    exclude_bos = gen.bos_token_id is not None
    scored = jax.vmap(lambda t: scored_positions(t, gen.pad_token_id, exclude_bos,
                                                 gen.bos_token_id)[0])(targets)
    # also drop what follows the end (fill tokens, which transformers pads out)
    scored = scored & (jnp.arange(m - 1)[None, None, :] < (lengths - 1)[:, :, None])
    seq_ll = jnp.sum(jnp.where(scored[:, :, None, :], tok_lp, 0.0), axis=-1)   # [B, C, K]
    if present is not None:
        seq_ll = jnp.where(present, seq_ll, -jnp.inf)
    loglik = jax.nn.logsumexp(seq_ll + doc_log_probs(doc_scores)[:, None, :], axis=-1)
    if deduplicate:
        earlier = jnp.tril(jnp.ones((c, c), bool), -1)                         # j < i
        duplicate = jnp.any(same & earlier[None], axis=-1)
        loglik = jnp.where(duplicate, -jnp.inf, loglik)
    top, pick = lax.top_k(loglik, r)
    return Generated(_take(candidates, pick), top, _take(lengths, pick))
