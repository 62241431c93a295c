"""The shared attention against a numpy softmax: masking, a row that may attend nowhere,
and dropout on the unnormalised weights."""

import jax.numpy as jnp
import numpy as np

from realm_jax.models.layers import dot_product_attention


def _reference(q, k, v, mask, keep=None):
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    if keep is not None:
        probs = probs * keep
    return np.einsum("bnts,bsnh->btnh", probs, v)


def test_attention_matches_softmax_reference():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 1, 5, 5), bool)
    mask[0, :, :, 3:] = False          # padded keys
    mask[1] = np.tril(mask[1])         # causal
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask)))
    np.testing.assert_allclose(out, _reference(q, k, v, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v)),
                               _reference(q, k, v, np.ones_like(mask)), rtol=1e-5, atol=1e-6)

    # A query that may attend nowhere averages the values instead of giving NaN.
    nowhere = mask.copy()
    nowhere[0, :, 2, :] = False
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(nowhere)))
    np.testing.assert_allclose(out[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], _reference(q, k, v, mask)[1], rtol=1e-5, atol=1e-6)

    # Dropout of the unnormalised weights equals dropout of the probabilities.
    keep = (rng.random((2, 3, 5, 5)) > 0.3) / 0.7
    out = np.asarray(dot_product_attention(q, k, v, jnp.asarray(mask),
                                           dropout=lambda w: w * keep))
    np.testing.assert_allclose(out, _reference(q, k, v, mask, keep), rtol=1e-5, atol=1e-6)


# --- the attention implementation of the model configs ----------------------------------

def _tiny_bart(**changes):
    from realm_jax.models.bart import BartConfig
    return BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                      decoder_ffn_dim=32, max_position_embeddings=32, dropout=0.0, **changes)


def test_xla_attention_matches_einsum_in_encoder_and_bart():
    import jax

    from realm_jax.models.bart import init_cache
    from realm_jax.models.encoder import EncoderConfig
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    enc = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    params = enc.module().init(jax.random.key(0), ids, mask)
    outs = [np.asarray(enc.replace(attention=a).module().apply(params, ids, mask)[0])
            for a in ("einsum", "xla")]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=0)

    # BART: padded source, causal decoder with a padded target, and one cached step.
    dec = rng.integers(1, 50, (2, 5)).astype(np.int32)
    dec_mask = np.ones_like(dec)
    dec_mask[0, 3:] = 0
    bart = _tiny_bart()
    params = bart.module().init(jax.random.key(0), ids, mask, dec)
    ref, got = (np.asarray(bart.replace(attention=a).module().apply(
        params, ids, mask, dec, dec_mask)) for a in ("einsum", "xla"))
    np.testing.assert_allclose(got[dec_mask == 1], ref[dec_mask == 1], atol=1e-5, rtol=0)

    def first_step(cfg):
        module = cfg.module()
        states = module.apply(params, ids, mask, method=type(module).encode)
        logits, _ = module.apply({**params, "cache": init_cache(cfg, 2, 5, 7)}, dec[:, :1],
                                 states, mask, decode=True, method=type(module).decode,
                                 mutable=["cache"])
        return np.asarray(logits)

    np.testing.assert_allclose(first_step(bart.replace(attention="xla")), first_step(bart),
                               atol=1e-5, rtol=0)


def test_bad_attention_names_the_field_and_old_configs_load():
    import pytest

    from realm_jax.models import config_from_dict, config_to_dict
    from realm_jax.models.encoder import EncoderConfig
    with pytest.raises(ValueError, match=r"EncoderConfig\.attention='flash'"):
        EncoderConfig(vocab_size=5, hidden_size=8, num_layers=1, num_heads=2,
                      intermediate_size=8, attention="flash")
    with pytest.raises(ValueError, match=r"BartConfig\.attention='XLA'"):
        _tiny_bart(attention="XLA")
    # model.json written before the field existed: loads with the default.
    saved = config_to_dict(_tiny_bart(attention="cudnn"))
    assert config_from_dict(saved) == _tiny_bart(attention="cudnn")
    del saved["attention"]
    assert config_from_dict(saved).attention == "einsum"
