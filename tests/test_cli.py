"""The `realm-jax` command, configs, params checkpoints and the demo job."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from realm_jax import cli, config, hf
from realm_jax.models import EmbedderConfig, EncoderConfig, config_from_dict, config_to_dict
from realm_jax import checkpoints

ENC = EncoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=32)


def _params(cfg):
    variables = cfg.module().init(jax.random.key(0), **cfg.example_inputs())
    return jax.tree.map(np.asarray, nn.unbox(variables)["params"])


def test_config_files_load_and_override():
    c = config.load_config("realm:tiny", "train.steps=7", "model.encoder.num_layers=3")
    assert c.train.steps == 7 and c.model.encoder.num_layers == 3
    enc = config.encoder_config(c.model.encoder)
    assert enc.num_layers == 3 and enc.hidden_size == 32
    base = config.load_config("realm")
    assert base.model.encoder.hidden_size == 768 and base.model.retriever_proj_size == 128
    for spec in ("rag:tiny,sequence", "rag:sequence"):
        rag = config.load_config(spec)
        assert rag.rag.loss == "sequence"
        assert config.bart_config(rag.model.generator).d_model in (32, 1024)
        assert config.encoder_config(rag.model.question_encoder).add_pooler is False
    assert config.load_config("rag").rag.loss == "token"
    with pytest.raises(ValueError, match="nope: no such field"):
        config.load_config("realm:tiny", "train.nope=1")


def test_config_flags_are_pulled_out_of_argv():
    cfg, rest = config.parse_config_flags(
        ["--workdir", "w", "--config", "configs/realm.py:tiny", "--config.seed=3", "--once"])
    assert cfg.seed == 3 and rest == ["--workdir", "w", "--once"]


def test_model_config_serialization_round_trip():
    cfg = EmbedderConfig(ENC, pooling="pooler", projection_dim=8, projection_layer_norm=True)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown model config type"):
        config_from_dict({"type": "Nope"})


def test_convert_both_ways(tmp_path, capsys):
    cfg = EmbedderConfig(ENC.replace(add_pooler=False), pooling="cls")  # DPR has no pooler
    params = _params(cfg)
    hf.save(tmp_path / "hf", cfg, params, architecture="DPRContextEncoder")
    assert cli.main(["convert", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    cfg2, params2 = checkpoints.load_params(tmp_path / "ours")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    assert cli.main(["convert", "--params", str(tmp_path / "ours"), "--out", str(tmp_path / "back"),
                     "--architecture", "DPRContextEncoder"]) == 0
    _, params3 = hf.load(tmp_path / "back")
    jax.tree.map(np.testing.assert_array_equal, params, params3)
    assert "DPRContextEncoder" in (tmp_path / "back" / "config.json").read_text()


def test_convert_exports_a_part_of_a_trainer_checkpoint(tmp_path, capsys):
    from realm_jax.models.heads import MaskedLMConfig
    configs = {"doc_tower": EmbedderConfig(ENC.replace(add_pooler=False), pooling="cls"),
               "reader": MaskedLMConfig(ENC.replace(add_pooler=False))}
    params = {part: _params(cfg) for part, cfg in configs.items()}
    later = jax.tree.map(lambda x: x + 1, params)
    with checkpoints.TrainCheckpoints(tmp_path / "run") as writer:
        writer.layout.write_model(configs)
        writer.save(3, params)
        writer.save(5, later)
    run = str(tmp_path / "run")
    assert cli.main(["convert", "--workdir", run, "--out", str(tmp_path / "reader")]) == 0
    assert "step 5" in capsys.readouterr().out
    cfg, exported = hf.load(tmp_path / "reader")
    assert cfg == configs["reader"]
    jax.tree.map(np.testing.assert_array_equal, later["reader"], exported)
    assert "BertForMaskedLM" in (tmp_path / "reader" / "config.json").read_text()
    assert cli.main(["convert", "--workdir", run, "--part", "doc_tower", "--step", "3",
                     "--out", str(tmp_path / "tower")]) == 0
    jax.tree.map(np.testing.assert_array_equal, params["doc_tower"],
                 hf.load_embedder(tmp_path / "tower", pooling="cls")[1])
    capsys.readouterr()
    for flags, says in ((["--part", "query_tower"], "--part query_tower"),
                        (["--step", "4"], "--step 4")):
        assert cli.main(["convert", "--workdir", run, "--out", str(tmp_path / "no"), *flags]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
        assert not (tmp_path / "no").exists()


def test_convert_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["T5Model"], "model_type": "t5"}')
    assert cli.main(["convert", "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "T5Model" in err and str(tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_sharded_restore_of_params(tmp_path):
    from realm_jax import sharding
    cfg = EmbedderConfig(ENC, pooling="mean")
    params = _params(cfg)
    checkpoints.save_params(tmp_path / "p", cfg, params)
    mesh = sharding.make_mesh((4, 1, 2))
    shardings = sharding.param_shardings(
        lambda: cfg.module().init(jax.random.key(0), **cfg.example_inputs()), mesh=mesh)["params"]
    _, restored = checkpoints.load_params(tmp_path / "p", shardings)
    wi = restored["encoder"]["layers"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(restored))


def test_demo_retrieves_the_right_articles(tmp_path, minilm_path):
    """The main job on two articles: questions land on the article that answers them."""
    from realm_jax import demo
    result = demo.run(workdir=tmp_path, model=minilm_path, max_articles=3, top_k=2, steps=0,
                      questions=["What is the albedo of snow?",
                                 "Which disorder affects social interaction and communication?"])
    titles = result["titles"]
    assert titles["What is the albedo of snow?"][0] == "Albedo"
    assert titles["Which disorder affects social interaction and communication?"][0] == "Autism"
    assert result["embeddings"].shape[1] == 384
