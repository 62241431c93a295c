"""Pure loss functions, arrays in and arrays out: REALM marginal MLM, ORQA, RAG-Sequence,
RAG-Token, ICT / DPR in-batch softmax, and the gradient cache for large contrastive
batches."""

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
    RetrievalLoss, dpr_loss, dpr_positive_index, ict_loss, in_batch_softmax)

__all__ = [
    "OrqaLoss", "best_span", "evidence_mask", "joint_span_logits", "marginal_nll", "orqa_loss",
    "span_valid_mask",
    "doc_log_probs", "marginalize_token_logprobs", "rag_sequence_nll", "rag_token_nll",
    "shift_targets", "split_docs",
    "RealmLoss", "ReaderInputs", "exclude_source", "prepend_null_score", "reader_inputs",
    "realm_loss", "realm_loss_from_logits", "target_log_probs",
    "RetrievalLoss", "dpr_loss", "dpr_positive_index", "ict_loss", "in_batch_softmax",
    "grad_cache_value_and_grad",
]
