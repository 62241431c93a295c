"""The experiment configs (configs/common.py + realm.py, orqa.py, rag.py) and their loading
through ml_collections' config_flags (realm_jax/config.py)."""

import dataclasses
import json

import ml_collections
import pytest

from configs import common
from realm_jax import config
from realm_jax.models.bart import BartConfig
from realm_jax.models.encoder import EncoderConfig
from realm_jax.refresh import RefreshSettings

VARIANTS = ("realm", "realm:tiny", "realm:demo", "orqa", "orqa:tiny", "rag", "rag:sequence",
            "rag:tiny", "rag:tiny,sequence", "ict", "ict:tiny", "dpr", "dpr:tiny")

# Fields the code reads that every config of the task must define (no defaults in code).
REQUIRED = {
    "all": ("task", "seed", "mesh.shape", "sharding_rules", "data.corpus", "data.tokenizer",
            "train.batch_size", "train.steps", "train.learning_rate", "train.warmup_steps",
            "train.decay", "train.weight_decay", "train.clip_norm", "train.checkpoint_every",
            "train.keep_checkpoints", "train.async_checkpoints", "train.log_every",
            "train.peak_flops_per_device", "train.fast_compile", "refresh.scann"),
    "realm": ("data.heldout_fraction", "data.answerable_only", "train.lr_multipliers",
              "train.eval_queries", "train.eval_batch_size", "train.eval_every",
              "train.max_index_staleness", "train.index_wait_seconds", "retrieval.mode",
              "retrieval.scann_threads", "model.encoder.remat", "model.doc_tower_hf"),
    "orqa": ("train.lr_multipliers", "train.eval_questions", "train.eval_every",
             "retrieval.mode", "retrieval.reader_length", "retrieval.index", "eval.recall_at",
             "model.init_from_realm", "model.realm_step"),
    "rag": ("train.question_encoder_lr_multiplier", "train.index_wait_seconds",
            "data.question_tokenizer", "data.generator_tokenizer", "model.context_encoder_hf",
            "retrieval.backend", "retrieval.scann_threads", "eval.n_docs", "eval.decoding"),
    "ict": ("data.heldout_fraction", "model.init_from_hf", "model.shared_towers",
            "train.loss_scale", "train.grad_cache_chunk_size", "ict.remove_probability",
            "eval.recall_at", "eval.num_questions", "refresh.title"),
    "dpr": ("data.train", "data.eval", "model.init_from_hf", "model.shared_towers",
            "train.loss_scale", "train.grad_cache_chunk_size", "dpr.num_hard_negatives",
            "eval.recall_at", "eval.num_questions", "refresh.title"),
}


def _has(c: ml_collections.ConfigDict, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for name in parents:
        if name not in c:
            return False
        c = c[name]
    return leaf in c


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _changed(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> set[str]:
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "absent") != fb.get(k, "absent")}


def section_dtype(c) -> str:
    return (c.model.encoder if "encoder" in c.model else c.model.question_encoder).dtype


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_loads_with_its_task_and_fields(spec):
    c = config.load_config(spec)
    task = spec.partition(":")[0]
    assert c.task == task
    missing = [f for f in REQUIRED["all"] + REQUIRED[task] if not _has(c, f)]
    assert not missing, f"{spec} lacks {missing}"
    # The sections build the model configs and the refresher's settings, field for field.
    sections = ({"encoder": c.model.encoder} if task != "rag" else
                {"question_encoder": c.model.question_encoder})
    # Attention: plain einsum on CPU (the tiny and demo variants, float32), the fused
    # jax.nn.dot_product_attention on accelerators (the paper sizes, bfloat16).
    attention = "einsum" if section_dtype(c) == "float32" else "xla"
    for name, section in sections.items():
        if spec != "realm:demo":  # the demo's sizes come from its HF folder
            assert config.encoder_config(section).attention == attention, name
        assert section.attention == attention
    if task == "rag":
        assert config.bart_config(c.model.generator).attention == attention
    c.data.corpus = "blocks"
    RefreshSettings.from_config(c)


@pytest.mark.parametrize("spec", [v for v in VARIANTS if "tiny" in v])
def test_tiny_variants_are_tiny(spec):
    c = config.load_config(spec)
    if c.task == "rag":
        assert c.model.question_encoder.hidden_size <= 64 and c.model.generator.d_model <= 64
    else:
        assert c.model.encoder.hidden_size <= 64
    assert c.train.steps <= 10 and c.train.batch_size <= 8
    assert c.model.get("encoder", c.model.get("question_encoder")).dtype == "float32"


def test_paper_settings():
    """The full-size variants keep the papers' settings."""
    realm = config.load_config("realm")
    assert (realm.retrieval.num_candidates, realm.retrieval.query_length,
            realm.retrieval.block_length, realm.retrieval.max_mask_tokens) == (8, 96, 288, 10)
    assert (realm.model.encoder.hidden_size, realm.model.retriever_proj_size) == (768, 128)
    assert realm.train.batch_size == 512
    orqa = config.load_config("orqa")
    assert (orqa.retrieval.beam_size, orqa.retrieval.num_read, orqa.model.max_span_width,
            orqa.retrieval.query_length, orqa.retrieval.reader_length) == (5000, 5, 10, 64, 320)
    assert (orqa.train.learning_rate, orqa.train.warmup_steps) == (1e-5, 4000)
    rag = config.load_config("rag")
    assert (rag.rag.loss, rag.rag.n_docs, rag.eval.n_docs) == ("token", 5, 15)
    assert (rag.model.generator.d_model, rag.model.question_encoder.add_pooler) == (1024, False)


def test_variants_change_only_their_fields():
    assert _changed(config.load_config("rag"), config.load_config("rag:sequence")) == {
        "rag.loss", "eval.n_docs"}
    assert _changed(config.load_config("rag:tiny"), config.load_config("rag:tiny,sequence")) == {
        "rag.loss"}
    demo = _changed(config.load_config("realm:tiny"), config.load_config("realm:demo"))
    assert "task" not in demo and "train.lr_multipliers.query_tower" in demo


def test_overrides_are_read_as_the_fields_types():
    c = config.load_config(
        "orqa:tiny", "train.steps=7", "train.learning_rate=1", "train.fast_compile=true",
        "eval.recall_at=(1,2)", "mesh.shape=2,1,1", "sharding_rules=(('batch','data'),)",
        "train.lr_multipliers.reader=0", "data.train=q.jsonl", "refresh.scann={'reorder': 5}")
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert c.train.fast_compile is True
    assert c.eval.recall_at == (1, 2) and c.mesh.shape == (2, 1, 1)
    assert c.sharding_rules == (("batch", "data"),)   # a None field: a Python literal
    assert c.train.lr_multipliers.reader == 0.0 and c.data.train == "q.jsonl"
    assert c.refresh.scann.to_dict() == {"reorder": 5}


def test_parse_config_flags_takes_both_spellings_and_leaves_the_rest():
    c, rest = config.parse_config_flags(
        ["--workdir", "w", "--config", "configs/rag.py:tiny,sequence", "--config.seed", "3",
         "--config.rag.n_docs=2", "--once"])
    assert (c.seed, c.rag.n_docs, c.rag.loss) == (3, 2, "sequence")
    assert rest == ["--workdir", "w", "--once"]


def test_override_of_a_saved_config():
    """WORKDIR/config.json comes back with lists for tuples; overrides still apply."""
    saved = ml_collections.ConfigDict(json.loads(json.dumps(
        config.load_config("realm:tiny").to_dict())))
    config.apply_override(saved, "mesh.shape", "(1,2,1)")
    config.apply_override(saved, "train.steps", "9")
    assert saved.mesh.shape == [1, 2, 1] and saved.train.steps == 9
    with pytest.raises(ValueError, match=r"--config.train.steps=x"):
        config.apply_override(saved, "train.steps", "x")


def test_a_run_saved_before_a_field_existed_reads_its_default(tmp_path):
    """Workdir.read_config lays WORKDIR/config.json over its task's config file: fields the
    run did not save read today's defaults, saved values (variants included) win."""
    from realm_jax.workdir import Workdir

    saved = config.load_config("rag:tiny,sequence", "train.steps=7").to_dict()
    del saved["retrieval"]["retriever_loss"], saved["eval"]["metrics"], saved["data"]["format"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    read = Workdir(tmp_path).read_config()
    default = config.load_config("rag")
    assert read.retrieval.retriever_loss == default.retrieval.retriever_loss
    assert tuple(read.eval.metrics) == tuple(default.eval.metrics)
    assert read.data.format == default.data.format
    assert (read.train.steps, read.rag.loss) == (7, "sequence") != (default.train.steps,
                                                                     default.rag.loss)
    (tmp_path / "config.json").write_text(json.dumps({"task": "nope", "seed": 3}))
    assert Workdir(tmp_path).read_config().to_dict() == {"task": "nope", "seed": 3}


@pytest.mark.parametrize("spec, overrides, error, match", [
    ("realm:tiny", ["train.nope=1"], ValueError, r"--config.train.nope: no such field"),
    ("realm:tiny", ["nope.x=1"], ValueError, r"--config.nope.x: no config section 'nope'"),
    ("realm:tiny", ["train.steps=1.5"], ValueError, r"--config.train.steps=1.5"),
    ("realm:tiny", ["train.async_checkpoints=maybe"], ValueError, r"async_checkpoints=maybe"),
    ("realm:tiny,sequence", [], ValueError, r"'sequence': unknown; known: \['demo', 'tiny'\]"),
    ("realm:tiny,demo", [], ValueError, r"tiny.*demo"),
    ("nope", [], FileNotFoundError, r"--config: no config file .*nope.py"),
])
def test_errors_name_the_flag(spec, overrides, error, match):
    with pytest.raises(error, match=match):
        config.load_config(spec, *overrides)


def test_a_file_without_get_config(tmp_path):
    (tmp_path / "x.py").write_text("A = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config.load_config(str(tmp_path / "x.py"))


def test_parse_arg():
    assert common.parse_arg(None, tiny=False, sequence=False).to_dict() == {
        "tiny": False, "sequence": False}
    assert common.parse_arg("tiny, sequence", tiny=False, sequence=False).to_dict() == {
        "tiny": True, "sequence": True}
    arg = common.parse_arg("n=3,name=x,flag=false", n=1, name="", flag=True)
    assert (arg.n, arg.name, arg.flag) == (3, "x", False)
    with pytest.raises(ValueError, match="'big': unknown"):
        common.parse_arg("tiny,big", tiny=False)


def test_sections_match_the_model_configs():
    """Every field of the size builders is an EncoderConfig / BartConfig field."""
    encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
    bart_fields = {f.name for f in dataclasses.fields(BartConfig)}
    for builder in (common.bert_base, common.tiny_encoder):
        assert set(builder()) <= encoder_fields
    for builder in (common.bart_large, common.tiny_bart):
        assert set(builder()) <= bart_fields
