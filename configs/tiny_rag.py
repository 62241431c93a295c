"""RAG at toy size: the whole code path on a CPU in seconds (used by the tests)."""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rag = ml_collections.ConfigDict(dict(
        loss="sequence" if arg == "sequence" else "token", n_docs=3, label_smoothing=0.0,
        exclude_bos_score=False, max_source_length=16, max_target_length=8,
        max_combined_length=48))
    c.model = ml_collections.ConfigDict()
    c.model.question_encoder_hf = ""
    c.model.context_encoder_hf = ""
    c.model.generator_hf = ""
    c.model.question_encoder = ml_collections.ConfigDict(dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
        dropout_rate=0.0, attention_dropout_rate=0.0, pad_token_id=0, add_pooler=False,
        dtype="float32", scan_layers=False, remat=False))
    c.model.generator = ml_collections.ConfigDict(dict(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, activation_function="gelu",
        scale_embedding=False, dropout=0.0, attention_dropout=0.0, dtype="float32",
        scan_layers=False, remat=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
    c.sharding_rules = None
    c.train = ml_collections.ConfigDict(dict(
        batch_size=4, steps=4, learning_rate=1e-3, warmup_steps=1, checkpoint_every=2,
        peak_flops_per_device=1e11))
    return c
