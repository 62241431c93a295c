"""RAG at the paper's size: DPR BERT-base question/context encoders, BART-large generator,
k = 5 documents (RAG-Token by default; `--config configs/rag_token_nq.py:sequence` for
RAG-Sequence)."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rag = ml_collections.ConfigDict(dict(
        loss="sequence" if arg == "sequence" else "token", n_docs=5, label_smoothing=0.1,
        exclude_bos_score=False, max_source_length=128, max_target_length=40,
        max_combined_length=300))
    c.model = ml_collections.ConfigDict()
    c.model.question_encoder_hf = ""   # local folder of a DPR question encoder (or a RAG folder)
    c.model.context_encoder_hf = ""    # local folder of the DPR context encoder (frozen)
    c.model.generator_hf = ""          # local folder of BART (bart-large)
    c.model.question_encoder = ml_collections.ConfigDict(dict(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
        dropout_rate=0.1, attention_dropout_rate=0.1, pad_token_id=0, add_pooler=False,
        dtype="bfloat16", scan_layers=True, remat=True))
    c.model.generator = ml_collections.ConfigDict(dict(
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu",
        scale_embedding=False, dropout=0.1, attention_dropout=0.1, dtype="bfloat16",
        scan_layers=True, remat=True))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))   # (data, fsdp, tensor)
    c.sharding_rules = None
    c.train = ml_collections.ConfigDict(dict(
        batch_size=128, steps=20_000, learning_rate=3e-5, warmup_steps=500,
        checkpoint_every=1000, peak_flops_per_device=197e12))
    return c
