"""Section builders shared by the experiment configs (configs/realm.py, orqa.py, rag.py).

Every field is defined and commented once: here when more than one experiment has it,
otherwise in the one experiment file that does. A builder returns its section at the full
size; keyword arguments replace fields or add the experiment's own. The `TINY_*` values and
`tiny_*` builders give the toy sizes of the `:tiny` variants, which run the whole code path
on a CPU in seconds (the tests use them).

Any field can be overridden on the command line:
`--config configs/realm.py:tiny --config.train.steps=10`.
"""

from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
    """The argument after `:` in `--config configs/x.py:ARG`, read once (as big_vision does):
    comma-separated words, each naming one of `defaults`: a bare word sets it to True
    ("tiny,sequence": tiny=True, sequence=True), `name=value` to the value read as the
    default's type. Every other name keeps its default; an unknown name is an error."""
    values = dict(defaults)
    for word in filter(None, (w.strip() for w in (arg or "").split(","))):
        name, has_value, raw = word.partition("=")
        if name not in defaults:
            raise ValueError(f"config argument {word!r}: unknown; known: {sorted(defaults)}")
        default = defaults[name]
        if not has_value:
            values[name] = True
        elif isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"config argument {word!r}: {name} is true or false")
            values[name] = raw.lower() == "true"
        else:
            values[name] = type(default)(raw) if default is not None else raw
    return ConfigDict(values)


def _section(fields: dict, changes: dict) -> ConfigDict:
    return ConfigDict(dict(fields, **changes))


def experiment(task: str) -> ConfigDict:
    """The top level of every config, before its sections."""
    return ConfigDict(dict(
        # Which trainer, refresher mode and answerer run it: "realm", "orqa" or "rag".
        task=task,
        # Every random choice (initialisation, masking, data order) derives from it.
        seed=0,
        # Devices as a (data, fsdp, tensor) mesh; -1: all the devices left.
        mesh=ConfigDict(dict(shape=(-1, 1, 1))),
        # Logical axis -> mesh axis rules; None: realm_jax.sharding.DEFAULT_RULES.
        sharding_rules=None,
    ))


def data(**changes) -> ConfigDict:
    """The `data` section's corpus, shared by the trainer and the refresher."""
    return _section(dict(
        # corpus: a block store from `realm-jax prepare-corpus` (DPR passages for RAG:
        # `--mode dpr`); tokenizer: the HF folder it was tokenized with ("": for the
        # refresher, the --from_hf folder's).
        corpus="", tokenizer="",
    ), changes)


def qa_data(**changes) -> ConfigDict:
    """`data` for question answering (ORQA, RAG): the corpus and the question sets."""
    return data(**dict(dict(
        # train / eval: QA data for realm_jax.data.qa.load_qa (a .jsonl / .json / .tsv file,
        # or tfds:NAME read from data_dir, "": TFDS's default folder) and their splits.
        train="tfds:natural_questions_open", train_split="train",
        eval="tfds:natural_questions_open", eval_split="validation", data_dir="",
    ), **changes))


# ---------------------------------------------------------------------------------------
# Model sizes: the fields of realm_jax.models EncoderConfig and BartConfig.

def run_knobs(cpu: bool = False) -> dict:
    """The fields of an encoder or generator section that are not sizes: the only ones that
    apply to weights loaded from an HF folder (whose sizes come from the folder)."""
    return dict(
        # Compute dtype (parameters stay float32): bfloat16 on accelerators, float32 on CPUs.
        dtype="float32" if cpu else "bfloat16",
        # scan_layers: the layers as one jax.lax.scan (compiled once, not once per layer);
        # remat: recompute each layer's activations in the backward pass (memory for FLOPs).
        scan_layers=not cpu, remat=not cpu,
        # Attention: "einsum" (plain XLA ops), or jax.nn.dot_product_attention's "xla" or
        # "cudnn" implementation (fused kernels on accelerators; einsum while attention
        # dropout is active, which that function does not do).
        attention="einsum" if cpu else "xla",
    )


def bert_base(**changes) -> ConfigDict:
    """BERT-base (uncased vocabulary): the size of the towers and readers in the papers."""
    return _section(dict(
        # Vocabulary, width, layers, heads, feed-forward width, positions, segment types.
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
        # dropout_rate: on the embeddings and each sublayer's output; attention_dropout_rate:
        # on the attention probabilities; pad_token_id: the padding token's id.
        dropout_rate=0.1, attention_dropout_rate=0.1, pad_token_id=0,
        # BERT's pooler (dense + tanh over [CLS]), which REALM's towers embed with; DPR's
        # encoders have none.
        add_pooler=True,
        **run_knobs(),
    ), changes)


def tiny_encoder(**changes) -> ConfigDict:
    """A 2-layer, 32-wide BERT without dropout, float32 and unscanned, for the CPU tests."""
    return bert_base(**dict(dict(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=128, dropout_rate=0.0, attention_dropout_rate=0.0,
        **run_knobs(cpu=True)), **changes))


def bart_large(**changes) -> ConfigDict:
    """BART-large, RAG's generator (the names are BartConfig's, as in transformers)."""
    return _section(dict(
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, max_position_embeddings=1024, activation_function="gelu",
        # scale_embedding: multiply token embeddings by sqrt(d_model) (BART: no).
        scale_embedding=False, dropout=0.1, attention_dropout=0.1,
        **run_knobs(),
    ), changes)


def tiny_bart(**changes) -> ConfigDict:
    """A 2+2-layer, 32-wide BART without dropout, float32 and unscanned."""
    return bart_large(**dict(dict(
        vocab_size=0, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        **run_knobs(cpu=True)), **changes))


def bert_model(encoder: ConfigDict, **changes) -> ConfigDict:
    """`model` of REALM and ORQA: BERT-layout retriever towers and reader."""
    return _section(dict(
        # One BERT-layout HF folder (BERT, MiniLM, ...) for every part ("": random weights
        # of the sizes in `encoder`); the towers take the folder's pooling.
        init_from_hf="",
        # Per-part HF folders (a REALM embedder or DPR question encoder; a REALM reader or
        # any BERT); each, when set, replaces what init_from_hf (or random init) gives it.
        query_tower_hf="", reader_hf="",
        encoder=encoder,
        # The towers' output: "pooler" (REALM), "cls" (DPR) or "mean"; projected to
        # retriever_proj_size (dense + LayerNorm, as REALM's 128; 0: the hidden size).
        pooling="pooler", retriever_proj_size=128,
    ), changes)


# ---------------------------------------------------------------------------------------
# Retrieval, training, evaluation, refreshing.

def retrieval(**changes) -> ConfigDict:
    """`retrieval` of REALM and ORQA (BERT towers over a block store)."""
    return _section(dict(
        # Wordpieces of a query (question) and of a retrieved block.
        query_length=96, block_length=288,
        # "device": exact search of the sharded corpus embeddings inside the step; "scann":
        # queries embedded and searched on the host, in the input pipeline.
        mode="device",
        # Factor on the inner products before the softmax over candidates (1: REALM's;
        # unit-length embeddings, as MiniLM's, want about 20); the device search's corpus
        # rows per block of its blocked top-k.
        score_scale=1.0, search_block_size=4096,
    ), changes)


TINY_RETRIEVAL = dict(query_length=24, block_length=32, search_block_size=256)


def train(*, batch_size: int, steps: int, learning_rate: float, warmup_steps: int,
          checkpoint_every: int, log_every: int, **changes) -> ConfigDict:
    """`train`: the schedule (which each experiment sets), the optimizer, checkpoints and
    logging."""
    return _section(dict(
        # Examples per step over all hosts; steps; peak learning rate reached by a linear
        # warmup over warmup_steps, then decay "linear" (to 0), "cosine" or "constant".
        batch_size=batch_size, steps=steps, learning_rate=learning_rate,
        warmup_steps=warmup_steps, decay="linear",
        # AdamW (BERT's betas and epsilon), no decay on biases and LayerNorms; gradients
        # clipped to this global norm.
        weight_decay=0.01, clip_norm=1.0,
        # Orbax checkpoints every checkpoint_every steps (and at the end), the newest
        # keep_checkpoints kept, written in the background when async_checkpoints.
        checkpoint_every=checkpoint_every, keep_checkpoints=3, async_checkpoints=True,
        # A metrics line every log_every steps; MFU is measured against this peak (one
        # device's FLOP/s: 197e12 is the bf16 peak of a TPU v5e chip).
        log_every=log_every, peak_flops_per_device=197e12,
        # Each model part's learning rate, weight decay included, as a factor of
        # learning_rate (0 freezes the part; a part not named keeps 1); see lr_multipliers.
        lr_multipliers={},
        # Cheap XLA compilation (CPU tests: compiling the step takes longer than running it).
        fast_compile=False,
        # Model config fields (their last name, e.g. "remat", "dtype") a resumed run may
        # change without being refused: fields that do not change the parameters.
        allow_model_changes=(),
    ), changes)


def lr_multipliers(**factors: float) -> dict:
    """For `train`: factors of the named parts' learning rates (RAG's question encoder also
    has train.question_encoder_lr_multiplier)."""
    return dict(lr_multipliers=factors)


TINY_TRAIN = dict(batch_size=8, steps=4, learning_rate=1e-3, warmup_steps=1, checkpoint_every=2,
                  log_every=1, peak_flops_per_device=1e11)  # 1e11: roughly 2 CPU cores' FP32


# Fields of the tasks that train on the refresher's index (REALM, RAG), which ORQA lacks.

def index_wait(seconds: float) -> dict:
    """For `train`: how long the trainer waits for an index snapshot in WORKDIR/index (the
    first one, or a newer one when REALM's is too stale) before it fails (or goes on with
    the one it has)."""
    return dict(index_wait_seconds=seconds)


def scann_threads(threads: int) -> dict:
    """For `retrieval`: threads of the host-side ScaNN search of the snapshot (0: all
    cores)."""
    return dict(scann_threads=threads)


def end_to_end(**changes) -> dict:
    """For `retrieval` of the fine-tuning tasks (ORQA, RAG): how the retriever is trained
    (realm_jax/tasks/orqa.py and rag.py; docs/experiments.md)."""
    return dict(dict(
        # "query_side": the document tower frozen (the papers'); "refresh": trainable
        # (model.train_doc_tower), the corpus re-embedded by the refresher from the run's
        # checkpoints, newer snapshots swapped in at step boundaries; "rerank": trainable,
        # over_retrieve candidates from the stale index re-embedded in the step, the best
        # kept by live score.
        strategy="query_side", over_retrieve=0,
        # The retriever's loss: "marginal" (the task's own), "emdr2", "pdist", "loop"
        # (objectives/distill.py); the target's temperature for pdist and loop.
        retriever_loss="marginal", distill_temperature=1.0,
        # Drift: every drift_every steps (0: never) overlap@k of the served index's top k
        # with an exact search over freshly embedded candidates, on drift_probes training
        # questions; written to WORKDIR/drift.json for `refresh.min_overlap`.
        drift_every=0, drift_probes=8,
    ), **changes)


def qa_eval(**changes) -> ConfigDict:
    """`eval` of the QA tasks (ORQA, RAG): `realm-jax eval` and evaluation while training."""
    return _section(dict(
        # num_questions of data.eval (0: all); questions per jitted batch; recall of the
        # top k retrieved blocks for each k in recall_at.
        num_questions=0, batch_size=64, recall_at=(1, 5),
    ), changes)


TINY_EVAL = dict(batch_size=8, recall_at=(1, 3))


def refresh(tiny: bool = False, **changes) -> ConfigDict:
    """`refresh`: the refresher (`realm-jax refresh`), realm_jax.refresh.RefreshSettings."""
    return _section(dict(
        # Titles joined to the text ("auto": for DPR passage stores; "yes" / "no"); the rows'
        # length cap (0: the tower's max_position_embeddings).
        title="auto", max_length=0,
        # Blocks per embedding batch; stored embedding dtype; blocks per embedding shard (0:
        # one per worker slice).
        batch_size=16 if tiny else 256, dtype="float16", shard_size=0 if tiny else 1_000_000,
        # How often to look for a newer checkpoint; index snapshots kept.
        poll_seconds=1.0 if tiny else 30.0, keep_snapshots=2 if tiny else 3,
        # realm_jax.index.ScannSettings (reorder: candidates re-scored exactly; num_threads
        # 0: all cores), or None for no ScaNN index (searched on the devices only).
        scann=dict(brute_force_below=20_000, num_neighbors=10, num_threads=1) if tiny else
        dict(brute_force_below=20_000, num_neighbors=10, reorder=100, num_threads=0),
        # The HF folder of the document tower that embeds the corpus while the run's
        # checkpoints hold none (the default of `--from_hf`; RAG's frozen context encoder).
        doc_tower_hf="",
        # Publish a run's newer checkpoint only when the trainer's measured drift overlap
        # (WORKDIR/drift.json, retrieval.drift_every) is under this (0: always publish).
        min_overlap=0.0,
    ), changes)


# ---------------------------------------------------------------------------------------
# Retriever training (ICT, DPR: realm_jax/tasks/retriever.py)

def retriever_model(encoder: ConfigDict, **changes) -> ConfigDict:
    """`model` of ICT and DPR: the query and document towers."""
    return _section(dict(
        # One HF folder (BERT, DPR, REALM embedder, sentence-transformers) for both towers,
        # with its pooling and normalisation ("": random towers of the sizes in `encoder`).
        init_from_hf="",
        encoder=encoder,
        # Random towers' output: "pooler" (REALM), "cls" (DPR) or "mean", projected to
        # retriever_proj_size (dense + LayerNorm, as REALM's 128; 0: the hidden size).
        pooling="pooler", retriever_proj_size=128,
        # One tower (the `doc_tower` part) embedding questions and passages alike.
        shared_towers=False,
    ), changes)


def retriever_train(**changes) -> dict:
    """For `train` of ICT and DPR: the loss's scale and the gradient cache."""
    return dict(dict(
        # Logits are loss_scale * q . d (an inverse temperature; about 20 for unit-length
        # embeddings such as MiniLM's).
        loss_scale=1.0,
        # > 0: the gradient cache, rows embedded this many at a time (must divide the
        # global batch and its passages); 0: the plain step.
        grad_cache_chunk_size=0,
    ), **changes)


def retriever_eval(**changes) -> ConfigDict:
    """`eval` of ICT and DPR (`realm-jax eval`): recall@k of the retrieved blocks."""
    return _section(dict(
        # num_questions (0: all); queries embedded per jitted batch; recall of the top k.
        num_questions=0, batch_size=64, recall_at=(1, 5, 20, 100),
    ), changes)
