"""Local Hugging Face checkpoint folders <-> (config, params), both ways.

Reads `config.json` + `model.safetensors` (or a sharded `model.safetensors.index.json`);
writes folders that `transformers` loads. No PyTorch: a folder holding only
`pytorch_model.bin` is refused with instructions.

Each supported architecture is a `Layout`: how to read our model config from the HF
config (and back), and a table of `Entry(our_path, hf_key, kind)` pairing every one of our
parameters with one HF tensor. `kind` says how the arrays relate:
  "kernel1" / "kernel2": a torch Linear weight [out, in] vs our kernel [in..., out...],
                         whose first 1 or 2 axes are the input axes;
  "vector": a 1-D HF tensor vs our tensor of any shape (e.g. a bias [heads, head_dim]);
  "matrix": the same shape on both sides (embedding tables);
  "row": an HF [1, n] tensor vs our [n] (BART's final_logits_bias).
An `optional` entry may be absent from a folder (it is then zeros) and is not written when
it is all zeros, as transformers treats BART's final_logits_bias (a BartModel has none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from flax import traverse_util

from realm_jax.durable import replace_folder
from realm_jax.models import abstract_params
from realm_jax.models.bart import BartConfig
from realm_jax.models.encoder import EncoderConfig
from realm_jax.models.heads import MaskedLMConfig, SpanReaderConfig
from realm_jax.models.rag import RAG_ARCHITECTURES, RagConfig
from realm_jax.models.towers import EmbedderConfig

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# Where a layout finds (or puts) the folder's generation_config.json inside the config dict.
_GENERATION_KEY = "_generation_config"


class CheckpointError(ValueError):
    """A Hugging Face folder that cannot be read or does not match the model."""


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]
    hf_key: str
    kind: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
    architectures: tuple[str, ...]
    model_type: str
    config_from_hf: Callable[[dict, str], Any]
    config_to_hf: Callable[[Any, str], dict]
    entries: Callable[[Any, str, str], list[Entry]]   # (config, architecture, body prefix)


# ---------------------------------------------------------------------------------------
# BERT-layout bodies (BERT, DPR, REALM)

_BERT_CONFIG_FIELDS = dict(
    vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
    num_heads="num_attention_heads", intermediate_size="intermediate_size",
    max_position_embeddings="max_position_embeddings", type_vocab_size="type_vocab_size",
    layer_norm_eps="layer_norm_eps", activation="hidden_act",
    dropout_rate="hidden_dropout_prob", attention_dropout_rate="attention_probs_dropout_prob",
    pad_token_id="pad_token_id")


def encoder_config_from_hf(hf: dict, add_pooler: bool = True) -> EncoderConfig:
    kwargs = {ours: hf[theirs] for ours, theirs in _BERT_CONFIG_FIELDS.items() if theirs in hf}
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"position_embedding_type={hf['position_embedding_type']!r} is not supported "
            "(only 'absolute')")
    return EncoderConfig(add_pooler=add_pooler, **kwargs)


def encoder_config_to_hf(cfg: EncoderConfig) -> dict:
    hf = {theirs: getattr(cfg, ours) for ours, theirs in _BERT_CONFIG_FIELDS.items()}
    hf.update(position_embedding_type="absolute", initializer_range=0.02)
    return hf


def _linear(path, key, kind="kernel1"):
    return [Entry(path + ("kernel",), key + ".weight", kind),
            Entry(path + ("bias",), key + ".bias", "vector")]


def _layer_norm(path, key):
    return [Entry(path + ("scale",), key + ".weight", "vector"),
            Entry(path + ("bias",), key + ".bias", "vector")]


def bert_body_entries(cfg: EncoderConfig, prefix: str, path: tuple[str, ...] = ()) -> list[Entry]:
    out = [Entry(path + (table, "embedding"), f"{prefix}embeddings.{table}.weight", "matrix")
           for table in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    out += _layer_norm(path + ("embeddings_ln",), prefix + "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        lp, lk = path + ("layers", f"layers_{i}"), f"{prefix}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out += _linear(lp + ("attention", name), lk + f"attention.self.{name}")
        out += _linear(lp + ("attention", "out"), lk + "attention.output.dense", "kernel2")
        out += _layer_norm(lp + ("attention_ln",), lk + "attention.output.LayerNorm")
        out += _linear(lp + ("mlp", "wi"), lk + "intermediate.dense")
        out += _linear(lp + ("mlp", "wo"), lk + "output.dense")
        out += _layer_norm(lp + ("mlp_ln",), lk + "output.LayerNorm")
    if cfg.add_pooler:
        out += _linear(path + ("pooler",), prefix + "pooler.dense")
    return out


def _mlm_entries(cfg: MaskedLMConfig, prefix: str) -> list[Entry]:
    head = "cls.predictions."
    return (bert_body_entries(cfg.encoder.replace(add_pooler=False), prefix, ("encoder",))
            + _linear(("transform",), head + "transform.dense")
            + _layer_norm(("transform_ln",), head + "transform.LayerNorm")
            + [Entry(("bias",), head + "bias", "vector")])


# BERT ----------------------------------------------------------------------------------

def _bert_from_hf(hf: dict, arch: str):
    if arch in ("BertForMaskedLM", "BertForPreTraining"):
        return MaskedLMConfig(encoder_config_from_hf(hf, add_pooler=False))
    return encoder_config_from_hf(hf)


def _bert_to_hf(cfg, arch: str) -> dict:
    enc = cfg.encoder if isinstance(cfg, MaskedLMConfig) else cfg
    return dict(encoder_config_to_hf(enc), model_type="bert", architectures=[arch])


def _bert_entries(cfg, arch: str, prefix: str) -> list[Entry]:
    if isinstance(cfg, MaskedLMConfig):
        return _mlm_entries(cfg, "bert.")
    return bert_body_entries(cfg, prefix)


BERT = Layout(("BertModel", "BertForMaskedLM", "BertForPreTraining"), "bert",
              _bert_from_hf, _bert_to_hf, _bert_entries)


# DPR -----------------------------------------------------------------------------------

_DPR_PREFIX = {"DPRQuestionEncoder": "question_encoder.bert_model.",
               "DPRContextEncoder": "ctx_encoder.bert_model."}


def _dpr_from_hf(hf: dict, arch: str) -> EmbedderConfig:
    # DPR's optional encode_proj (projection_dim > 0) is a plain Linear on the CLS state.
    return EmbedderConfig(encoder_config_from_hf(hf, add_pooler=False), pooling="cls",
                          projection_dim=hf.get("projection_dim") or None)


def _dpr_to_hf(cfg: EmbedderConfig, arch: str) -> dict:
    return dict(encoder_config_to_hf(cfg.encoder), model_type="dpr", architectures=[arch],
                projection_dim=cfg.projection_dim or 0)


def _dpr_entries(cfg: EmbedderConfig, arch: str, prefix: str) -> list[Entry]:
    p = _DPR_PREFIX[arch]
    out = bert_body_entries(cfg.encoder, p, ("encoder",))
    if cfg.projection_dim:
        out += _linear(("projection",), p.replace("bert_model.", "encode_proj"))
    return out


DPR = Layout(tuple(_DPR_PREFIX), "dpr", _dpr_from_hf, _dpr_to_hf, _dpr_entries)


# REALM ---------------------------------------------------------------------------------
# transformers 5 dropped REALM's modeling code; its checkpoints keep this layout.

_SPAN_READER_FIELDS = ("span_hidden_size", "max_span_width", "reader_layer_norm_eps")


def _given(hf: dict, fields: Iterable[str]) -> dict:
    """The `fields` an HF config sets (not null); the others keep our configs' defaults."""
    return {k: hf[k] for k in fields if hf.get(k) is not None}


def _realm_from_hf(hf: dict, arch: str):
    enc = encoder_config_from_hf(hf, add_pooler=arch == "RealmEmbedder")
    if arch == "RealmEmbedder":
        return EmbedderConfig(enc, pooling="pooler", projection_layer_norm=True,
                              projection_dim=hf.get("retriever_proj_size", 128))
    if arch == "RealmKnowledgeAugEncoder":
        return MaskedLMConfig(enc)
    return SpanReaderConfig(enc, **_given(hf, _SPAN_READER_FIELDS))


def _realm_to_hf(cfg, arch: str) -> dict:
    hf = dict(encoder_config_to_hf(cfg.encoder), model_type="realm", architectures=[arch])
    if isinstance(cfg, EmbedderConfig):
        hf["retriever_proj_size"] = cfg.projection_dim
    if isinstance(cfg, SpanReaderConfig):
        hf.update({k: getattr(cfg, k) for k in _SPAN_READER_FIELDS})
    return hf


def _realm_entries(cfg, arch: str, prefix: str) -> list[Entry]:
    if isinstance(cfg, MaskedLMConfig):
        return _mlm_entries(cfg, "realm.")
    body = bert_body_entries(cfg.encoder, "realm.", ("encoder",))
    if isinstance(cfg, EmbedderConfig):
        return (body + _linear(("projection",), "cls.dense")
                + _layer_norm(("projection_ln",), "cls.LayerNorm"))
    return (body + _linear(("span_intermediate",), "qa_outputs.dense_intermediate")
            + _linear(("span_output",), "qa_outputs.dense_output")
            + _layer_norm(("span_ln",), "qa_outputs.layer_normalization"))


REALM = Layout(("RealmEmbedder", "RealmKnowledgeAugEncoder", "RealmReader"), "realm",
               _realm_from_hf, _realm_to_hf, _realm_entries)


# BART ----------------------------------------------------------------------------------
# BartModel folders (e.g. facebook/bart-large, RAG's generator) load into the full
# seq2seq LM as transformers' BartForConditionalGeneration.from_pretrained does: the LM
# head is tied to `shared`, and final_logits_bias is zeros when absent.

_BART_ARCHS = ("BartForConditionalGeneration", "BartModel")
_BART_CONFIG_FIELDS = (
    "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
    "activation_function", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id", "dropout", "attention_dropout", "activation_dropout")


def _bart_from_hf(hf: dict, arch: str) -> BartConfig:
    if not hf.get("tie_word_embeddings", True):
        raise CheckpointError("BART with an untied LM head (tie_word_embeddings=false) is "
                              "not supported")
    # Legacy fields of older BART configs; set otherwise, they describe an mBART-like model.
    for flag, bart_value in (("normalize_before", False), ("add_final_layer_norm", False),
                             ("normalize_embedding", True)):
        if hf.get(flag, bart_value) != bart_value:
            raise CheckpointError(f"BART with {flag}={hf[flag]!r} is not supported (only "
                                  f"{flag}={bart_value}, the BART layout)")
    return BartConfig(hf_architecture=arch, **_given(hf, _BART_CONFIG_FIELDS))


def _bart_to_hf(cfg: BartConfig, arch: str) -> dict:
    hf = {k: getattr(cfg, k) for k in _BART_CONFIG_FIELDS}
    hf.update(model_type="bart", architectures=[arch], is_encoder_decoder=True,
              tie_word_embeddings=True, init_std=0.02, encoder_layerdrop=0.0,
              decoder_layerdrop=0.0, classifier_dropout=0.0, use_cache=True)
    return hf


def _bart_layer_entries(path, key, cross: bool) -> list[Entry]:
    out = []
    attentions = [("attention", "self_attn")]
    if cross:
        attentions.append(("cross_attention", "encoder_attn"))
    for ours, theirs in attentions:
        for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out += _linear(path + (ours, name), f"{key}{theirs}.{proj}")
        out += _linear(path + (ours, "out"), f"{key}{theirs}.out_proj", "kernel2")
        out += _layer_norm(path + (ours + "_ln",), f"{key}{theirs}_layer_norm")
    out += _linear(path + ("mlp", "wi"), key + "fc1")
    out += _linear(path + ("mlp", "wo"), key + "fc2")
    out += _layer_norm(path + ("mlp_ln",), key + "final_layer_norm")
    return out


def _bart_entries(cfg: BartConfig, arch: str, prefix: str) -> list[Entry]:
    # The body prefix is "model." in BartForConditionalGeneration folders (and in some
    # BartModel ones, e.g. facebook/bart-large); on writing, the architecture decides.
    p = prefix or ("model." if arch == "BartForConditionalGeneration" else "")
    out = [Entry(("shared", "embedding"), p + "shared.weight", "matrix"),
           Entry(("final_logits_bias",), "final_logits_bias", "row", optional=True)]
    for side, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        out.append(Entry((side, "embed_positions", "embedding"),
                         f"{p}{side}.embed_positions.weight", "matrix"))
        out += _layer_norm((side, "layernorm_embedding"), f"{p}{side}.layernorm_embedding")
        for i in range(layers):
            out += _bart_layer_entries((side, "layers", f"layers_{i}"),
                                       f"{p}{side}.layers.{i}.", side == "decoder")
    return out


BART = Layout(_BART_ARCHS, "bart", _bart_from_hf, _bart_to_hf, _bart_entries)

# RAG -----------------------------------------------------------------------------------
# RagTokenForGeneration / RagSequenceForGeneration folders (facebook/rag-token-nq,
# rag-sequence-nq): "rag.question_encoder.question_encoder.bert_model.*" (a DPR question
# encoder) and "rag.generator.model.*" + "rag.generator.final_logits_bias" (BART); a
# RagModel has no "rag." prefix. config.json nests the two models' configs.

_BART_FORCED_EOS_DEFAULT = 2   # transformers' BartConfig default when the field is absent
_RAG_CONFIG_FIELDS = ("n_docs", "title_sep", "doc_sep", "max_combined_length")


def _rag_from_hf(hf: dict, arch: str) -> RagConfig:
    q, g = hf.get("question_encoder"), hf.get("generator")
    if not isinstance(q, dict) or not isinstance(g, dict):
        raise CheckpointError("a RAG config.json needs question_encoder and generator sections")
    if q.get("model_type", "dpr") != "dpr":
        raise CheckpointError(f"RAG question encoder {q.get('model_type')!r} is not supported "
                              "(only DPR)")
    if g.get("model_type", "bart") != "bart":
        raise CheckpointError(f"RAG generator {g.get('model_type')!r} is not supported "
                              "(only BART)")

    generation = hf.get(_GENERATION_KEY)

    def token(name: str, default: int | None) -> int | None:
        if generation is not None:     # generation_config.json decides, as in transformers
            return generation.get(name)
        if hf.get(name) is not None:   # older folders: the RAG config's own value wins,
            return hf[name]            # then its generator's, then BART's default
        return g[name] if name in g else default

    return RagConfig(
        _dpr_from_hf(q, "DPRQuestionEncoder"), _bart_from_hf(g, "BartForConditionalGeneration"),
        prefix=hf.get("prefix") or g.get("prefix") or "", **_given(hf, _RAG_CONFIG_FIELDS),
        forced_bos_token_id=token("forced_bos_token_id", None),
        forced_eos_token_id=token("forced_eos_token_id", _BART_FORCED_EOS_DEFAULT),
        hf_architecture=arch)


def _rag_to_hf(cfg: RagConfig, arch: str) -> dict:
    generator = _bart_to_hf(cfg.generator, "BartForConditionalGeneration")
    generator.update(forced_bos_token_id=cfg.forced_bos_token_id,
                     forced_eos_token_id=cfg.forced_eos_token_id)
    return dict(
        model_type="rag", architectures=[arch], is_encoder_decoder=True,
        question_encoder=_dpr_to_hf(cfg.question_encoder, "DPRQuestionEncoder"),
        generator=generator, prefix=cfg.prefix or None,
        **{k: getattr(cfg, k) for k in _RAG_CONFIG_FIELDS},
        retrieval_vector_size=cfg.retrieval_dim, use_cache=True, label_smoothing=0.0,
        reduce_loss=False, do_deduplication=True, exclude_bos_score=False,
        do_marginalize=False, output_retrieved=False,
        **{_GENERATION_KEY: dict(
            bos_token_id=cfg.generator.bos_token_id, eos_token_id=cfg.generator.eos_token_id,
            pad_token_id=cfg.generator.pad_token_id,
            decoder_start_token_id=cfg.generator.decoder_start_token_id,
            forced_bos_token_id=cfg.forced_bos_token_id,
            forced_eos_token_id=cfg.forced_eos_token_id)})


def _nest(entries: list[Entry], path: str, key: str) -> list[Entry]:
    return [dataclasses.replace(e, path=(path,) + e.path, hf_key=key + e.hf_key) for e in entries]


def _rag_entries(cfg: RagConfig, arch: str, prefix: str) -> list[Entry]:
    # On reading, the question encoder's body prefix tells whether there is a "rag." level;
    # on writing, the architecture decides.
    top = "" if (prefix and not prefix.startswith("rag.")) or arch == "RagModel" else "rag."
    return (_nest(_dpr_entries(cfg.question_encoder, "DPRQuestionEncoder", ""),
                  "question_encoder", top + "question_encoder.")
            + _nest(_bart_entries(cfg.generator, "BartForConditionalGeneration", "model."),
                    "generator", top + "generator."))


RAG = Layout(RAG_ARCHITECTURES, "rag", _rag_from_hf, _rag_to_hf, _rag_entries)

LAYOUTS: list[Layout] = [BERT, DPR, REALM, BART, RAG]


def _layout_for(hf: dict, where: Path) -> tuple[Layout, str]:
    archs = hf.get("architectures") or []
    found = [(layout, a) for layout in LAYOUTS for a in archs if a in layout.architectures]
    # no architectures field: fall back on model_type
    found += [(layout, layout.architectures[0]) for layout in LAYOUTS
              if not archs and layout.model_type == hf.get("model_type")]
    if found:
        return found[0]
    known = sorted(a for layout in LAYOUTS for a in layout.architectures)
    raise CheckpointError(f"{where}: unsupported architecture {archs or hf.get('model_type')!r}"
                          f"; supported: {', '.join(known)}")


def _layout_for_config(cfg, architecture: str | None) -> tuple[Layout, str]:
    if not architecture and isinstance(cfg, EmbedderConfig):
        architecture = {"cls": "DPRQuestionEncoder", "pooler": "RealmEmbedder",
                        "mean": "BertModel"}[cfg.pooling]
    elif not architecture:
        defaults = {EncoderConfig: "BertModel", MaskedLMConfig: "BertForMaskedLM",
                    SpanReaderConfig: "RealmReader"}
        architecture = defaults.get(type(cfg), getattr(cfg, "hf_architecture", None))
        if architecture is None:
            raise CheckpointError(f"no Hugging Face architecture known for {type(cfg).__name__}")
    for layout in LAYOUTS:
        if architecture in layout.architectures:
            return layout, architecture
    raise CheckpointError(f"unknown architecture {architecture!r}")


# ---------------------------------------------------------------------------------------
# Array conversions

def _to_ours(arr: np.ndarray, kind: str, shape: tuple[int, ...], key: str, file: Path
             ) -> np.ndarray:
    n_in = int(kind[-1]) if kind.startswith("kernel") else 0
    expected = ((math.prod(shape[n_in:]), math.prod(shape[:n_in])) if n_in else
                {"vector": (math.prod(shape),), "matrix": shape, "row": (1,) + shape}[kind])
    if arr.shape != expected:
        raise CheckpointError(f"{file}: tensor {key} has shape {arr.shape}, expected {expected}")
    return (np.ascontiguousarray(arr.T) if n_in else arr).reshape(shape)


def _to_hf(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind.startswith("kernel"):
        n_in = int(kind[-1])
        return np.ascontiguousarray(arr.reshape(math.prod(arr.shape[:n_in]), -1).T)
    return arr.reshape({"vector": (-1,), "matrix": arr.shape, "row": (1, -1)}[kind])


def _map_layer_stacks(params: dict, fn: Callable[[dict], dict]) -> dict:
    """`params` with the subtree of every LayerStack (a "layers" key) replaced by `fn` of it."""
    if not isinstance(params, dict):
        return params
    return {name: fn(sub) if name == "layers" else _map_layer_stacks(sub, fn)
            for name, sub in params.items()}


def stack_layers(params: dict) -> dict:
    """Unrolled `layers_i` subtrees -> one `layers` subtree stacked on a leading axis
    (the nn.scan layout), in every LayerStack of the tree. Each stack keeps its own depth
    (BART's encoder and decoder may differ)."""
    def stack(layers: dict) -> dict:
        per_layer = [layers[f"layers_{i}"] for i in range(len(layers))]
        return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}

    return _map_layer_stacks(params, stack)


def unstack_layers(params: dict) -> dict:
    """Inverse of `stack_layers`."""
    def unstack(layers: dict) -> dict:
        stacked = layers["layers"]
        n = jax.tree.leaves(stacked)[0].shape[0]
        return {f"layers_{i}": jax.tree.map(lambda x: np.asarray(x)[i], stacked)
                for i in range(n)}

    return _map_layer_stacks(params, unstack)


def _encoder_of(cfg) -> EncoderConfig | None:
    return cfg if isinstance(cfg, EncoderConfig) else getattr(cfg, "encoder", None)


def unrolled(cfg):
    """The same config with scan_layers off (the layout the HF tables describe); it equals
    `cfg` when no part scans its layers."""
    if isinstance(cfg, RagConfig):
        return cfg.replace(question_encoder=unrolled(cfg.question_encoder),
                           generator=unrolled(cfg.generator))
    enc = _encoder_of(cfg)
    if enc is not None and enc is not cfg:
        return dataclasses.replace(cfg, encoder=unrolled(enc))
    return dataclasses.replace(cfg, scan_layers=False)


# ---------------------------------------------------------------------------------------
# Reading

def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a Hugging Face folder needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = folder / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / SAFETENSORS
    if single.exists():
        with _reading_safetensors(single), safe_open(str(single), "np") as f:
            return {k: single for k in f.keys()}
    for name in ("pytorch_model.bin", "model.bin", "tf_model.h5", "flax_model.msgpack"):
        if (folder / name).exists():
            raise CheckpointError(
                f"{folder / name}: realm-jax reads safetensors only (no PyTorch/TensorFlow at "
                f"run time). Convert it once where torch is installed: python -c \"from "
                f"transformers import AutoModel; AutoModel.from_pretrained('{folder}')"
                f".save_pretrained('{folder}', safe_serialization=True)\"")
    raise CheckpointError(f"{folder}: no {SAFETENSORS} or {SAFETENSORS_INDEX}")


def _read_tensors(files: dict[str, Path], keys: Iterable[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    keys = list(keys)
    out = {}
    for file in {files[k] for k in keys}:
        with _reading_safetensors(file), safe_open(str(file), "np") as f:
            out.update({k: f.get_tensor(k) for k in keys if files[k] == file})
    return out


@contextlib.contextmanager
def _reading_safetensors(file: Path) -> Iterator[None]:
    """A safetensors file that cannot be read (truncated, garbage) as a CheckpointError
    naming it."""
    from safetensors import SafetensorError
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be "
                              "truncated: copy or convert it again") from e


def _body_prefix(keys: Iterable[str]) -> str:
    """What precedes the body's keys, e.g. "bert." or "model." ("" for none)."""
    for suffix in ("embeddings.word_embeddings.weight", "shared.weight"):  # BERT, BART
        for k in keys:
            if k == suffix or k.endswith("." + suffix):
                return k[: -len(suffix)]
    return ""


def load(folder: str | os.PathLike, **overrides) -> tuple[Any, dict]:
    """Read a Hugging Face folder into (model config, params as numpy arrays).

    `overrides` replace fields of the encoder / model config (e.g. dtype="bfloat16",
    scan_layers=True); with scan_layers the layer params are returned stacked."""
    folder = Path(folder)
    hf = _read_config(folder)
    layout, arch = _layout_for(hf, folder)
    if layout is RAG and (folder / GENERATION_CONFIG).exists():
        hf[_GENERATION_KEY] = json.loads((folder / GENERATION_CONFIG).read_text())
    files = _tensor_files(folder)
    cfg = layout.config_from_hf(hf, arch)
    prefix = _body_prefix(files)
    if isinstance(cfg, EncoderConfig) and prefix + "pooler.dense.weight" not in files:
        cfg = cfg.replace(add_pooler=False)  # saved with add_pooling_layer=False
    cfg = _apply_overrides(cfg, overrides)
    flat_cfg = unrolled(cfg)
    entries = layout.entries(flat_cfg, arch, prefix)
    shapes = traverse_util.flatten_dict(abstract_params(flat_cfg))
    missing = [e.hf_key for e in entries if e.hf_key not in files and not e.optional]
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} tensor(s) missing for {arch}, first: {missing[0]}")
    arrays = _read_tensors(files, [e.hf_key for e in entries if e.hf_key in files])
    params = {}
    for e in entries:
        if e.path not in shapes:
            raise CheckpointError(f"internal: no parameter {'/'.join(e.path)} in {arch}")
        shape = tuple(shapes[e.path].shape)
        if e.hf_key in files:
            params[e.path] = _to_ours(arrays[e.hf_key].astype(np.float32), e.kind, shape,
                                      e.hf_key, files[e.hf_key])
        else:  # an optional tensor the folder does not hold
            params[e.path] = np.zeros(shape, np.float32)
    unset = sorted("/".join(path) for path in set(shapes) - set(params))
    if unset:
        raise CheckpointError(f"internal: {arch} table leaves {unset} unset")
    params = traverse_util.unflatten_dict(params)
    return cfg, (params if flat_cfg == cfg else stack_layers(params))


def _leaf_fields(cfg) -> set[str]:
    """The fields of `cfg` and of the configs nested in it, not naming a nested config."""
    out: set[str] = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out |= _leaf_fields(value) if dataclasses.is_dataclass(value) else {f.name}
    return out


def _apply_overrides(cfg, overrides: dict):
    """Each override sets the field of `cfg` itself, else that of every config nested in it
    that has it (e.g. dtype: a RAG model's question encoder's encoder and its generator)."""
    unknown = sorted(set(overrides) - _leaf_fields(cfg))
    if unknown:
        raise CheckpointError(f"unknown {type(cfg).__name__} override(s): {', '.join(unknown)}")
    own = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    changes = {k: v for k, v in overrides.items()
               if k in own and not dataclasses.is_dataclass(own[k])}
    for name, part in own.items():
        if dataclasses.is_dataclass(part):
            fields = _leaf_fields(part)
            changes[name] = _apply_overrides(
                part, {k: v for k, v in overrides.items() if k in fields and k not in changes})
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------
# Writing

def save(folder: str | os.PathLike, cfg, params: dict, architecture: str | None = None,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write `params` as a Hugging Face folder (config.json + model.safetensors) that
    `transformers` loads. The folder is written next to its final name and renamed into
    place, so a crash leaves no half-written checkpoint."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    layout, arch = _layout_for_config(cfg, architecture)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    flat_cfg = unrolled(cfg)
    if flat_cfg != cfg:
        params = unstack_layers(params)
    params = traverse_util.flatten_dict(params)
    tensors = {}
    for e in layout.entries(flat_cfg, arch, ""):
        value = params.get(e.path)
        if value is None and not e.optional:
            raise CheckpointError(f"params lack {'/'.join(e.path)} needed for {e.hf_key}")
        if value is not None and (np.any(value) or not e.optional):
            tensors[e.hf_key] = _to_hf(value, e.kind)
    tensors.update(_tied_tensors(tensors))
    hf_config = layout.config_to_hf(flat_cfg, arch)
    hf_config["torch_dtype"] = "float32"
    generation = hf_config.pop(_GENERATION_KEY, None)

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
    for name, data in (("config.json", hf_config), (GENERATION_CONFIG, generation)):
        if data is not None:
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name, text in (extra_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    replace_folder(tmp, folder)
    return folder


def _tied_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF checkpoints also carry the tied MLM decoder; write it so strict loaders agree."""
    out = {}
    for bias_key in [k for k in tensors if k.endswith("cls.predictions.bias")]:
        body = bias_key[: -len("cls.predictions.bias")]
        word = next(k for k in tensors if k.endswith("embeddings.word_embeddings.weight"))
        out[body + "cls.predictions.decoder.weight"] = tensors[word]
        out[body + "cls.predictions.decoder.bias"] = tensors[bias_key]
    return out


# ---------------------------------------------------------------------------------------
# Tokenizers and sentence-transformers pooling

def load_tokenizer(folder: str | os.PathLike):
    """The folder's fast tokenizer (transformers, offline)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / n).exists() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json, vocab.txt or "
                              "vocab.json)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def sentence_transformers_pooling(folder: str | os.PathLike) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers folder (modules.json), or None."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "cls", False
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Pooling"):
            pcfg = json.loads((folder / m["path"] / "config.json").read_text())
            if pcfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            elif pcfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            else:
                raise CheckpointError(f"{folder / m['path'] / 'config.json'}: only mean or CLS "
                                      "pooling is supported")
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def load_embedder(folder: str | os.PathLike, pooling: str | None = None,
                  normalize: bool | None = None, **overrides) -> tuple[EmbedderConfig, dict]:
    """A retriever tower from any supported folder: DPR and REALM embedders as they are; a
    plain BERT folder wrapped with the pooling of its sentence-transformers config (mean +
    normalize for all-MiniLM-L6-v2), or CLS pooling."""
    cfg, params = load(folder, **overrides)
    if isinstance(cfg, EncoderConfig):
        st = sentence_transformers_pooling(folder) or ("cls", False)
        cfg = EmbedderConfig(cfg, pooling=pooling or st[0],
                             normalize=st[1] if normalize is None else normalize)
        params = {"encoder": params}
    elif not isinstance(cfg, EmbedderConfig):
        raise CheckpointError(f"{folder}: holds a {type(cfg).__name__}, not a retriever tower")
    elif pooling or normalize is not None:
        cfg = dataclasses.replace(cfg, pooling=pooling or cfg.pooling,
                                  normalize=cfg.normalize if normalize is None else normalize)
    return cfg, params


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt")


def tokenizer_files(folder: str | os.PathLike) -> dict[str, str]:
    """{name: text} of the tokenizer files a folder holds (to write beside weights)."""
    folder = Path(folder)
    out = {n: (folder / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES
           if (folder / n).is_file()}
    if not out:
        raise CheckpointError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return out


def save_embedder(folder: str | os.PathLike, cfg: EmbedderConfig, params: dict, *,
                  architecture: str | None = None, extra_files: dict[str, str] | None = None
                  ) -> Path:
    """`save` for a retriever tower: a mean-pooled one as its BERT encoder with the
    sentence-transformers files of `embedder_files` (what `load_embedder` reads back), the
    others in their own layout (DPR for CLS pooling, REALM's embedder for the pooler)."""
    extra = dict(extra_files or {}, **embedder_files(cfg))
    if cfg.pooling == "mean":
        return save(folder, cfg.encoder, params["encoder"], architecture=architecture,
                    extra_files=extra)
    return save(folder, cfg, params, architecture=architecture, extra_files=extra)


def embedder_files(cfg: EmbedderConfig) -> dict[str, str]:
    """{name: text}: the sentence-transformers files (modules.json, pooling, normalize) that
    `save_embedder` writes beside a tower's weights (nothing where the layout suffices)."""
    if cfg.pooling != "mean" and not cfg.normalize:
        return {}
    if cfg.pooling != "mean" or cfg.projection_dim:
        raise CheckpointError(f"a tower with pooling={cfg.pooling!r}, normalize={cfg.normalize}"
                              f", projection_dim={cfg.projection_dim} has no Hugging Face "
                              "layout that keeps all three")
    kinds = ["Transformer", "Pooling"] + (["Normalize"] if cfg.normalize else [])
    modules = [{"idx": i, "name": str(i), "path": f"{i}_{kind}" if i else "",
                "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(kinds)]
    pooling = {"word_embedding_dimension": cfg.output_dim, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}
    return {"modules.json": json.dumps(modules, indent=2) + "\n",
            "1_Pooling/config.json": json.dumps(pooling, indent=2) + "\n"}
