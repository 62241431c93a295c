"""Parity of the BERT-layout models with Hugging Face PyTorch on the same weights, the
HF round trip, and the errors for bad folders."""

import json

import jax
import numpy as np
import pytest

from realm_jax import hf
from realm_jax.models.encoder import EncoderConfig
from realm_jax.models.heads import MaskedLMConfig, SpanReaderConfig
from realm_jax.models.towers import EmbedderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
            hidden_act="gelu")


def _inputs(batch=3, length=12, vocab=99, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0          # padded rows
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def _torch(*arrays):
    return [torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in arrays]


def _save_torch(model, folder):
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _apply(cfg, params, *args, **kwargs):
    return cfg.module().apply({"params": params}, *args, **kwargs)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY))
    return _save_torch(model, tmp_path_factory.mktemp("bert")), model


def test_bert_encoder_matches_torch(bert_folder):
    folder, model = bert_folder
    cfg, params = hf.load(folder)
    assert isinstance(cfg, EncoderConfig) and cfg.add_pooler
    ids, mask, types = _inputs()
    hidden, pooled = _apply(cfg, params, ids, mask, types)
    with torch.no_grad():
        ref = model(*_torch(ids, mask, types))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], ref.last_hidden_state.numpy()[valid],
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=TOL, rtol=0)


def test_xla_attention_override_matches_torch(bert_folder):
    """`attention` is a run-time knob: not in the HF config, given to `hf.load`."""
    folder, model = bert_folder
    cfg, params = hf.load(folder, attention="xla")
    assert cfg.attention == "xla" and hf.load(folder)[0].attention == "einsum"
    ids, mask, types = _inputs()
    hidden, _ = _apply(cfg, params, ids, mask, types)
    with torch.no_grad():
        ref = model(*_torch(ids, mask, types)).last_hidden_state.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], ref[valid], atol=TOL, rtol=0)


def test_scanned_and_unrolled_layouts_agree(bert_folder):
    folder, _ = bert_folder
    cfg, params = hf.load(folder)
    scfg, sparams = hf.load(folder, scan_layers=True, remat=True)
    assert sparams["layers"]["layers"]["attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
    ids, mask, types = _inputs()
    a = _apply(cfg, params, ids, mask, types)[0]
    b = _apply(scfg, sparams, ids, mask, types)[0]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_masked_lm_matches_torch(tmp_path):
    torch.manual_seed(1)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**TINY))
    cfg, params = hf.load(_save_torch(model, tmp_path / "mlm"))
    assert isinstance(cfg, MaskedLMConfig)
    ids, mask, types = _inputs()
    logits = _apply(cfg, params, ids, mask, types)
    with torch.no_grad():
        ref = model(*_torch(ids, mask, types)).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], atol=TOL, rtol=0)
    # Logits at selected positions only equal the full logits there.
    positions = np.array([[1, 4], [0, 6], [2, 2]], np.int32)
    picked = _apply(cfg, params, ids, mask, types, positions)
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(logits), positions[..., None], 1),
                               atol=1e-5)


@pytest.mark.parametrize("cls_name", ["DPRQuestionEncoder", "DPRContextEncoder"])
def test_dpr_encoders_match_torch(tmp_path, cls_name):
    torch.manual_seed(2)
    model = getattr(transformers, cls_name)(transformers.DPRConfig(**TINY))
    folder = _save_torch(model, tmp_path / cls_name)
    cfg, params = hf.load(folder)
    assert isinstance(cfg, EmbedderConfig) and cfg.pooling == "cls"
    ids, mask, types = _inputs()
    out = _apply(cfg, params, ids, mask, types)
    with torch.no_grad():
        ref = model(*_torch(ids, mask, types)).pooler_output.numpy()
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
    # Export and let transformers load it back: same outputs.
    hf.save(tmp_path / "out", cfg, params, architecture=cls_name)
    reloaded = getattr(transformers, cls_name).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = reloaded(*_torch(ids, mask, types)).pooler_output.numpy()
    np.testing.assert_allclose(again, ref, atol=1e-6, rtol=0)


def test_round_trip_is_exact(bert_folder, tmp_path):
    folder, model = bert_folder
    cfg, params = hf.load(folder)
    hf.save(tmp_path / "rt", cfg, params)
    cfg2, params2 = hf.load(tmp_path / "rt")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    reloaded = transformers.BertModel.from_pretrained(tmp_path / "rt").eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_scanned_round_trip(bert_folder, tmp_path):
    folder, _ = bert_folder
    cfg, params = hf.load(folder, scan_layers=True)
    hf.save(tmp_path / "rt", cfg, params)
    _, flat = hf.load(folder)
    _, again = hf.load(tmp_path / "rt")
    jax.tree.map(np.testing.assert_array_equal, flat, again)


def _random_params(cfg, seed=0):
    variables = cfg.module().init(jax.random.key(seed), **cfg.example_inputs())
    from flax import linen as nn
    return jax.tree.map(np.asarray, nn.unbox(variables)["params"])


def test_realm_embedder_layout(tmp_path):
    """REALM's modeling code is gone from transformers 5; check the embedder's layout and
    numerics against torch BertModel (body + pooler) + Linear + LayerNorm on the same weights."""
    enc = hf.encoder_config_from_hf(TINY | {"layer_norm_eps": 1e-12})
    cfg = EmbedderConfig(enc, pooling="pooler", projection_dim=16, projection_layer_norm=True)
    params = _random_params(cfg)
    folder = hf.save(tmp_path / "realm", cfg, params)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["RealmEmbedder"] and config["retriever_proj_size"] == 16
    cfg2, params2 = hf.load(folder)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    from safetensors.numpy import load_file
    tensors = load_file(str(folder / "model.safetensors"))
    assert "cls.dense.weight" in tensors and "realm.pooler.dense.weight" in tensors
    body = {k[len("realm."):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("realm.")}
    bert = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    bert.load_state_dict(body, strict=False)
    ids, mask, types = _inputs()
    with torch.no_grad():
        pooled = bert(*_torch(ids, mask, types)).pooler_output
        proj = torch.nn.functional.linear(pooled, torch.from_numpy(tensors["cls.dense.weight"]),
                                          torch.from_numpy(tensors["cls.dense.bias"]))
        ref = torch.nn.functional.layer_norm(proj, (16,), torch.from_numpy(tensors["cls.LayerNorm.weight"]),
                                             torch.from_numpy(tensors["cls.LayerNorm.bias"]), 1e-12)
    np.testing.assert_allclose(_apply(cfg2, params2, ids, mask, types), ref.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("make_cfg, arch, key", [
    (lambda enc: MaskedLMConfig(enc), "RealmKnowledgeAugEncoder", "cls.predictions.transform.dense.weight"),
    (lambda enc: SpanReaderConfig(enc, span_hidden_size=8), "RealmReader", "qa_outputs.dense_intermediate.weight"),
])
def test_realm_encoder_and_reader_layouts(tmp_path, make_cfg, arch, key):
    cfg = make_cfg(hf.encoder_config_from_hf(TINY, add_pooler=False))
    params = _random_params(cfg)
    folder = hf.save(tmp_path / arch, cfg, params, architecture=arch)
    from safetensors.numpy import load_file
    assert key in load_file(str(folder / "model.safetensors"))
    cfg2, params2 = hf.load(folder)
    assert type(cfg2) is type(cfg)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_minilm_sentence_embeddings_match_torch(minilm_path):
    from realm_jax.embedding import TextEmbedder

    texts = ["The cat sat on the mat.",
             "Anarchism is a political philosophy and movement that is skeptical of authority.",
             "Albedo", ""]
    embedder = TextEmbedder.from_hf(minilm_path)
    assert embedder.config.pooling == "mean" and embedder.config.normalize
    ours = embedder.embed(texts, batch_size=2)

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.BertModel.from_pretrained(minilm_path).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.numpy(), atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------
# Bad input

def test_pytorch_bin_only_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(hf.CheckpointError, match=r"pytorch_model\.bin.*safetensors only"):
        hf.load(tmp_path)


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(hf.CheckpointError, match="GPT2LMHeadModel"):
        hf.load(tmp_path)


def test_missing_tensor_is_named(bert_folder, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder, _ = bert_folder
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["encoder.layer.1.attention.self.value.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(hf.CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.value\.bias"):
        hf.load(tmp_path)


def test_shape_mismatch_names_file_and_tensor(bert_folder, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder, _ = bert_folder
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((63, 32), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(hf.CheckpointError,
                       match=r"model\.safetensors: tensor encoder\.layer\.0\.intermediate\.dense\.weight has shape \(63, 32\)"):
        hf.load(tmp_path)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(hf.CheckpointError, match="no such checkpoint folder"):
        hf.load(tmp_path / "nope")
    with pytest.raises(hf.CheckpointError, match=r"config\.json: missing"):
        hf.load(tmp_path)
