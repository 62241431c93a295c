"""Pure loss functions, arrays in and arrays out: REALM marginal MLM, ORQA, RAG-Sequence,
RAG-Token, ICT / DPR in-batch softmax, the gradient cache for large contrastive batches, and
the retriever losses that distill the reader into the retriever (EMDR², perplexity
distillation, LOOP)."""

from realm_jax.objectives.distill import (
    RetrieverLoss, emdr2_loss, leave_one_out_marginals, loop_loss, marginal_loss, pdist_loss)
from realm_jax.objectives.grad_cache import grad_cache_value_and_grad
from realm_jax.objectives.orqa import (
    OrqaLoss, best_span, evidence_mask, joint_span_logits, marginal_nll, orqa_loss,
    span_valid_mask)
from realm_jax.objectives.rag import (
    doc_log_probs, marginalize_token_logprobs, rag_sequence_nll, rag_token_nll, shift_targets,
    split_docs)
from realm_jax.objectives.realm import (
    RealmLoss, ReaderInputs, exclude_source, prepend_null_score, reader_inputs, realm_loss,
    realm_loss_from_logits, target_log_probs)
from realm_jax.objectives.retrieval import (
    RetrievalLoss, dpr_loss, ict_loss, in_batch_softmax)

__all__ = [
    "RetrieverLoss", "emdr2_loss", "leave_one_out_marginals", "loop_loss", "marginal_loss",
    "pdist_loss",
    "OrqaLoss", "best_span", "evidence_mask", "joint_span_logits", "marginal_nll", "orqa_loss",
    "span_valid_mask",
    "doc_log_probs", "marginalize_token_logprobs", "rag_sequence_nll", "rag_token_nll",
    "shift_targets", "split_docs",
    "RealmLoss", "ReaderInputs", "exclude_source", "prepend_null_score", "reader_inputs",
    "realm_loss", "realm_loss_from_logits", "target_log_probs",
    "RetrievalLoss", "dpr_loss", "ict_loss", "in_batch_softmax",
    "grad_cache_value_and_grad",
]
