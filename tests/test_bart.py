"""BART: parity with Hugging Face PyTorch on the same weights, incremental decoding with the
cache, the HF round trip both ways, the nn.scan layout, and the sharded forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import hf, sharding
from realm_jax.models.bart import Bart, BartConfig, init_cache, reorder_cache, shift_tokens_right

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# Compiling is most of these tests' time; XLA's backend optimizations roughly double it and
# buy nothing at these sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
PAD, EOS, START = 1, 2, 2
# Encoder and decoder differ in depth and width, so that a mix-up cannot pass.
TINY = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=48, max_position_embeddings=64, scale_embedding=True,
            activation_function="gelu", pad_token_id=PAD, eos_token_id=EOS,
            decoder_start_token_id=START)


def _batch(seed=0):
    """Encoder inputs and decoder inputs (shifted labels), both with right padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, size=(4, 9)).astype(np.int32)
    ids[:, -1] = EOS
    mask = np.ones_like(ids)
    for row, length in ((1, 6), (2, 3)):
        ids[row, length - 1] = EOS
        ids[row, length:] = PAD
        mask[row, length:] = 0
    labels = rng.integers(3, 99, size=(4, 7)).astype(np.int32)
    labels[:, -1] = EOS
    for row, length in ((0, 4), (3, 2)):
        labels[row, length - 1] = EOS
        labels[row, length:] = -100
    dec = np.asarray(shift_tokens_right(labels, PAD, START))
    dec_mask = (np.arange(7)[None, :] <= (labels != -100).sum(1)[:, None] - 1).astype(np.int32)
    return ids, mask, labels, dec, dec_mask


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


@pytest.fixture(scope="module")
def torch_bart(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(**TINY)).eval()
    with torch.no_grad():   # a non-zero bias, so that it is really compared
        model.final_logits_bias.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("bart")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def loaded(torch_bart):
    return hf.load(torch_bart[0])


@pytest.fixture(scope="module")
def reference(torch_bart):
    """HF's encoder states and logits on the padded batch."""
    _, model = torch_bart
    ids, mask, _, dec, dec_mask = _batch()
    with torch.no_grad():
        out = model(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec),
                    decoder_attention_mask=_t(dec_mask))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def _encode_and_decode(model, ids, mask, dec, dec_mask):
    states = model.encode(ids, mask)
    return states, model.decode(dec, states, mask, dec_mask)


@pytest.fixture(scope="module")
def fns(loaded):
    """Jitted functions shared by the tests, so that each compiles once per config and
    shape: forward (ids, mask, dec, dec_mask) ->
    (encoder states, logits), and a decoding step (cache, ids, states, mask, dec_mask) ->
    (logits, {"cache": cache})."""
    cfg, _ = loaded

    def make(cfg):
        model = cfg.module()
        forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=_encode_and_decode),
                          compiler_options=FAST_COMPILE)
        step = jax.jit(lambda p, cache, ids, states, mask, dmask: model.apply(
            {"params": p, "cache": cache}, ids, states, mask, dmask, decode=True,
            method=Bart.decode, mutable=["cache"]), compiler_options=FAST_COMPILE)
        return forward, step

    return {False: make(cfg), True: make(cfg.replace(scan_layers=True, remat=True))}


def test_config_read_from_hf(loaded):
    cfg, params = loaded
    assert cfg == BartConfig(**TINY, dropout=0.1, hf_architecture="BartForConditionalGeneration")
    assert params["encoder"]["embed_positions"]["embedding"].shape == (66, 32)
    assert params["decoder"]["layers"]["layers_2"]["cross_attention"]["query"]["kernel"].shape == (32, 4, 8)
    assert len(params["encoder"]["layers"]) == 2 and len(params["decoder"]["layers"]) == 3
    from realm_jax.models import config_from_dict, config_to_dict
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_shift_tokens_right_matches_hf():
    from transformers.models.bart.modeling_bart import shift_tokens_right as hf_shift
    _, _, labels, dec, _ = _batch()
    np.testing.assert_array_equal(dec, hf_shift(_t(labels), PAD, START).numpy())


def test_encoder_states_and_logits_match_torch(loaded, reference, fns):
    cfg, params = loaded
    ids, mask, _, dec, dec_mask = _batch()
    ref_states, ref_logits = reference
    states, logits = map(np.asarray, fns[False][0](params, ids, mask, dec, dec_mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(states[valid], ref_states[valid], atol=TOL, rtol=0)
    assert logits.shape == (4, 7, 99) and logits.dtype == np.float32
    dvalid = dec_mask.astype(bool)
    assert not dvalid.all() and not valid.all()
    np.testing.assert_allclose(logits[dvalid], ref_logits[dvalid], atol=TOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_incremental_decoding_equals_full_pass(loaded, fns, scan):
    cfg, params = loaded
    if scan:
        cfg, params = cfg.replace(scan_layers=True, remat=True), hf.stack_layers(params)
    forward, step = fns[scan]
    ids, mask, _, dec, dec_mask = _batch()
    states, full = forward(params, ids, mask, dec, dec_mask)
    full = np.asarray(full)
    batch, length = dec.shape

    # Unrolled: a prompt of 2 positions, then one position at a time (teacher forcing);
    # scanned: one at a time throughout. The decoder padding mask spans the whole cache.
    # The first call fills the cross-attention cache; later ones do not read the encoder
    # states (given zeros here, to show it).
    cache = init_cache(cfg, batch, length, ids.shape[1])
    first = 1 if scan else 2
    logits, v = step(params, cache, dec[:, :first], states, mask, dec_mask)
    pieces = [logits]
    cache = v["cache"]
    for t in range(first, length):
        logits, v = step(params, cache, dec[:, t:t + 1], jnp.zeros_like(states), mask, dec_mask)
        pieces.append(logits)
        cache = v["cache"]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)

    # Beam-search style reordering: after 4 positions, row r continues row order[r].
    order = np.array([2, 0, 0, 3], np.int32)
    cache = init_cache(cfg, batch, length, ids.shape[1])
    for t in range(4):
        _, v = step(params, cache, dec[:, t:t + 1], states, mask, dec_mask)
        cache = v["cache"]
    cache = reorder_cache(cache, order)
    logits, _ = step(params, cache, dec[order, 4:5], states[order], mask[order], dec_mask[order])
    np.testing.assert_allclose(logits[:, 0], full[order, 4], atol=1e-5, rtol=0)


def test_greedy_decoding_matches_torch(loaded, fns, torch_bart):
    """Greedy generation with our cache picks the tokens HF's (cached) greedy loop picks."""
    cfg, params = loaded
    forward, step = fns[False]
    _, model = torch_bart
    ids, mask, _, dec, dec_mask = _batch()
    steps = dec.shape[1]
    states, _ = forward(params, ids, mask, dec, dec_mask)
    cache = init_cache(cfg, ids.shape[0], steps, ids.shape[1])
    tokens = np.full((ids.shape[0], 1), START, np.int32)
    ours = []
    all_valid = np.ones_like(dec_mask)   # (the same shapes as above: no new compilation)
    for _ in range(steps):
        logits, v = step(params, cache, tokens, states, mask, all_valid)
        cache = v["cache"]
        tokens = np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)[:, None]
        ours.append(tokens)
    ours = np.concatenate(ours, axis=1)

    with torch.no_grad():
        enc = model.get_encoder()(input_ids=_t(ids), attention_mask=_t(mask))
        tokens, past, theirs = _t(np.full((ids.shape[0], 1), START)), None, []
        for _ in range(steps):
            out = model(encoder_outputs=enc, attention_mask=_t(mask), decoder_input_ids=tokens,
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            theirs.append(tokens.numpy())
    np.testing.assert_array_equal(ours, np.concatenate(theirs, axis=1))


def test_round_trip_and_transformers_loads_export(loaded, torch_bart, reference, tmp_path):
    cfg, params = loaded
    folder, model = torch_bart
    out = hf.save(tmp_path / "rt", cfg, params)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BartForConditionalGeneration"]
    cfg2, params2 = hf.load(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    reloaded = transformers.BartForConditionalGeneration.from_pretrained(out).eval()
    ours, theirs = reloaded.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name].numpy(), theirs[name].numpy(), err_msg=name)
    ids, mask, _, dec, dec_mask = _batch()
    with torch.no_grad():
        logits = reloaded(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec),
                          decoder_attention_mask=_t(dec_mask)).logits.numpy()
    np.testing.assert_array_equal(logits, reference[1])


def test_bart_model_folder_loads_as_seq2seq(tmp_path, fns):
    """A BartModel folder (no "model." prefix, no final_logits_bias) loads into the full
    model with a zero bias and the LM head tied to `shared`, and is written back as one."""
    torch.manual_seed(3)
    base = transformers.BartModel(transformers.BartConfig(**TINY)).eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    cfg, params = hf.load(tmp_path / "base")
    assert cfg.hf_architecture == "BartModel"
    assert not np.any(params["final_logits_bias"])
    ids, mask, _, dec, dec_mask = _batch()
    with torch.no_grad():
        out = base(input_ids=_t(ids), attention_mask=_t(mask), decoder_input_ids=_t(dec),
                   decoder_attention_mask=_t(dec_mask))
        ref_logits = (out.last_hidden_state @ base.shared.weight.T).numpy()
    states, logits = map(np.asarray, fns[False][0](params, ids, mask, dec, dec_mask))
    valid, dvalid = mask.astype(bool), dec_mask.astype(bool)
    np.testing.assert_allclose(states[valid], out.encoder_last_hidden_state.numpy()[valid],
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[dvalid], ref_logits[dvalid], atol=TOL, rtol=0)
    hf.save(tmp_path / "again", cfg, params)
    from safetensors.numpy import load_file
    keys = set(load_file(str(tmp_path / "again" / "model.safetensors")))
    assert keys == set(load_file(str(tmp_path / "base" / "model.safetensors")))
    reloaded = transformers.BartModel.from_pretrained(tmp_path / "again").eval()
    for name, tensor in base.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


def test_scan_layout_matches_unrolled(torch_bart, loaded, reference, fns, tmp_path):
    folder, _ = torch_bart
    scfg, sparams = hf.load(folder, scan_layers=True, remat=True)
    assert scfg.scan_layers and scfg.remat
    assert sparams["encoder"]["layers"]["layers"]["attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
    assert sparams["decoder"]["layers"]["layers"]["mlp"]["wi"]["kernel"].shape == (3, 32, 48)
    ids, mask, _, dec, dec_mask = _batch()
    unrolled = fns[False][0](loaded[1], ids, mask, dec, dec_mask)
    scanned = fns[True][0](sparams, ids, mask, dec, dec_mask)
    for a, b in zip(scanned, unrolled):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # Scanned params are written in the HF (unrolled) layout.
    hf.save(tmp_path / "scan", scfg, sparams)
    _, again = hf.load(tmp_path / "scan")
    jax.tree.map(np.testing.assert_array_equal, loaded[1], again)


def test_sharded_forward_matches_single_device(loaded, fns):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (emulated) devices")
    cfg, params = loaded
    mesh = sharding.make_mesh((2, 1, 4))          # data x tensor
    model = cfg.module()
    ids, mask, _, dec, dec_mask = _batch()

    def init(rng):
        return model.init(rng, **cfg.example_inputs())

    shardings = sharding.param_shardings(init, jax.random.key(0), mesh=mesh)["params"]
    placed = sharding.place(params, shardings)
    query = placed["encoder"]["layers"]["layers_0"]["attention"]["query"]["kernel"]
    assert query.sharding.spec[1] == "tensor"                      # heads over tensor
    assert query.sharding.shard_shape(query.shape) == (32, 1, 8)
    wi = placed["decoder"]["layers"]["layers_2"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.shard_shape(wi.shape) == (32, 12)           # mlp over tensor
    assert placed["shared"]["embedding"].sharding.spec[0] is None  # 99 rows: not divisible

    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def forward_and_prefill(p, cache, ids, mask, dec, dec_mask):
        """__call__, and the same target run through the decoding cache in one call."""
        logits = model.apply({"params": p}, ids, mask, dec, dec_mask)
        states = model.apply({"params": p}, ids, mask, method=Bart.encode)
        cached, v = model.apply({"params": p, "cache": cache}, dec, states, mask, dec_mask,
                                decode=True, method=Bart.decode, mutable=["cache"])
        return logits, cached, v["cache"]

    with sharding.activate(mesh):
        run = jax.jit(forward_and_prefill,
                      in_shardings=(shardings, None) + (batch_sharding,) * 4,
                      compiler_options=FAST_COMPILE)
        logits, cached, cache = run(placed, init_cache(cfg, *dec.shape, ids.shape[1]), ids, mask, dec, dec_mask)
    single = fns[False][0](params, ids, mask, dec, dec_mask)[1]
    np.testing.assert_allclose(logits, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cached, single, atol=1e-5, rtol=0)
    # The decoding cache follows the activations: batch over data, heads over tensor.
    key = cache["decoder"]["layers"]["layers_0"]["attention"]["cached_key"]
    assert key.sharding.shard_shape(key.shape) == (2, 7, 1, 8)


# ---------------------------------------------------------------------------------------
# Bad input

def test_untied_lm_head_is_refused(torch_bart, tmp_path):
    folder, _ = torch_bart
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": False}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(hf.CheckpointError, match="tie_word_embeddings"):
        hf.load(tmp_path)


def test_missing_bart_tensor_is_named(torch_bart, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder, _ = torch_bart
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.decoder.layers.2.encoder_attn.v_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(hf.CheckpointError, match=r"model\.decoder\.layers\.2\.encoder_attn\.v_proj\.bias"):
        hf.load(tmp_path)


def test_too_long_input_is_refused(loaded):
    cfg, params = loaded
    ids = np.zeros((1, 65), np.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        cfg.module().apply({"params": params}, ids, None, ids[:, :2])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        init_cache(cfg, 1, 65, 9)
    ids, mask, *_ = _batch()
    states = np.zeros((4, 8, 32), np.float32)    # the cache was made for 9 encoder positions
    with pytest.raises(ValueError, match="context of"):
        jax.eval_shape(lambda: cfg.module().apply(
            {"params": params, "cache": init_cache(cfg, 4, 3, 9)}, ids[:, :1], states, mask[:, :8],
            decode=True, method=Bart.decode, mutable=["cache"]))
