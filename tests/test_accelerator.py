"""benchmarks/accelerator.py, the accelerator check: its --tiny run on the CPU gives every
row of the table with finite positive figures (so the GPU run cannot rot), its model-FLOPs
count agrees with XLA's, and its docs section is kept by the suite."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
accelerator = pytest.importorskip("accelerator")
pytest.importorskip("torch")
pytest.importorskip("transformers")

# Rows of a CPU run (on a GPU, encoder_cudnn too); those compared with PyTorch; those
# against the chip's peak.
ROWS = ("mips_bfloat16_batch", "mips_bfloat16_batch_default", "mips_bfloat16_step",
        "mips_float32_batch", "mips_float32_step", "encoder_einsum", "encoder_xla",
        "corpus_embedding", "reembed_1", "reembed_8", "realm_scann_step", "realm_scann_flops",
        "realm_device_step", "realm_device_flops", "rag_token_step")
WITH_PYTORCH = ("encoder_einsum", "encoder_xla", "corpus_embedding", "reembed_1", "reembed_8",
                "rag_token_step")
OF_PEAK = tuple(k for k in ROWS if k.startswith("mips_") or k.endswith("_flops"))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(BENCHMARKS / "accelerator.py"), "--tiny",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return done, out


def test_tiny_run_gives_every_row(tiny_run):
    done, out = tiny_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert sorted(rows) == sorted(ROWS)
    for key, row in rows.items():
        assert not row["error"] and _positive(row["value"]), row
        if key in WITH_PYTORCH:
            assert _positive(row["reference"]) and _positive(row["ratio"]), row
        if key in OF_PEAK:
            assert _positive(row["utilization"]), row
    # On paper: eight chips re-embed the corpus in an eighth of one chip's time.
    assert rows["reembed_8"]["value"] == pytest.approx(rows["reembed_1"]["value"] / 8)
    assert rows["reembed_1"]["value"] == pytest.approx(
        accelerator.REALM_CORPUS_ROWS / rows["corpus_embedding"]["value"] / 3600)
    # The same weights on both sides.
    cosine = re.search(r"lowest cosine to PyTorch ([0-9.]+)", rows["corpus_embedding"]["note"])
    assert float(cosine.group(1)) > 0.999
    for key in ("encoder_einsum", "encoder_xla"):
        diff = re.search(r"relative difference to PyTorch ([0-9.e+-]+)", rows[key]["note"])
        assert float(diff.group(1)) < 1e-3

    section = (out / "accelerator.md").read_text()
    assert section.startswith(f"<!-- bench:{accelerator.SECTION} -->")
    assert section.rstrip().endswith(f"<!-- /bench:{accelerator.SECTION} -->")
    for row in rows.values():
        assert f"| {row['measurement']} |" in section
    assert "| measurement | unit | realm-jax | PyTorch |" in done.stdout


def test_encoder_flops_agree_with_xla():
    """The model-FLOPs count against XLA's count of an unrolled encoder's forward (which
    also counts the element-wise work: a few percent more)."""
    import jax
    import numpy as np

    from realm_jax.models.encoder import EncoderConfig

    # By hand: one layer, D=2, F=3, T=5: 2*5*(4*4 + 2*2*3) + 4*25*2 = 480.
    tiny = EncoderConfig(vocab_size=10, hidden_size=2, num_layers=1, num_heads=1,
                         intermediate_size=3, add_pooler=False)
    assert accelerator.encoder_flops(tiny, 1, 5) == 480
    cfg = EncoderConfig(vocab_size=100, hidden_size=256, num_layers=2, num_heads=4,
                        intermediate_size=1024, max_position_embeddings=64)
    ids = np.ones((2, 64), np.int32)
    module = cfg.module()
    params = module.init(jax.random.key(0), ids)
    compiled = jax.jit(lambda p, i: module.apply(p, i)).lower(params, ids).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours = accelerator.encoder_flops(cfg, 2, 64)
    assert 1.0 <= xla / ours < 1.08, (xla, ours)


def test_matmul_flops_count_every_scanned_layer():
    """The trainer's MFU divides by `matmul_flops`, counted from the jaxpr: the same for an
    encoder with scanned and unrolled layers (XLA's cost analysis counts a scanned body
    once), equal to the shape count of its forward, and about 3x that for a gradient."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from realm_jax.models.encoder import EncoderConfig
    from realm_jax.train.metrics import matmul_flops

    x, w = jnp.ones((3, 4)), jnp.ones((4, 4))
    assert matmul_flops(lambda x, w: x @ w, x, w) == 2 * 3 * 4 * 4
    six = lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=6)[0]  # noqa
    assert matmul_flops(six, x, w) == 6 * 2 * 3 * 4 * 4
    branches = lambda x, w: jax.lax.cond(x[0, 0] > 0, lambda: x @ w @ w, lambda: x)  # noqa
    assert matmul_flops(jax.jit(branches), x, w) == 2 * 2 * 3 * 4 * 4
    fast = jax.jit(branches, compiler_options={"xla_backend_optimization_level": 0})
    assert matmul_flops(fast, x, w) == 2 * 2 * 3 * 4 * 4     # as the trainer's step is

    ids = np.ones((2, 16), np.int32)
    counts = []
    for scan in (False, True):
        cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4,
                            intermediate_size=64, max_position_embeddings=16, scan_layers=scan)
        module = cfg.module()
        params = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))  # noqa: B023
        forward = matmul_flops(lambda p, i: module.apply(p, i), params, ids)  # noqa: B023
        assert forward == accelerator.encoder_flops(cfg, 2, 16)
        grad = jax.grad(lambda p, i: jnp.sum(module.apply(p, i)[0] ** 2))  # noqa: B023
        counts.append((forward, matmul_flops(grad, params, ids)))
    assert counts[0] == counts[1]
    assert 2.9 < counts[0][1] / counts[0][0] <= 3.0


def test_docs_section_survives_the_suite():
    suite = pytest.importorskip("suite")
    ours = f"<!-- bench:{accelerator.SECTION} -->\n## Accelerator\nfirst run\n" \
           f"<!-- /bench:{accelerator.SECTION} -->\n"
    encoder = "<!-- bench:encoder -->\n## Encoder\nold\n<!-- /bench:encoder -->\n"
    doc = suite.assemble({accelerator.SECTION: ours}, suite.INTRO + "\n" + encoder)
    assert doc.index("bench:encoder") < doc.index(f"bench:{accelerator.SECTION}")
    new_encoder = encoder.replace("old", "new")
    again = suite.assemble({"encoder": new_encoder}, doc)
    assert ours in again and new_encoder in again and "\nold\n" not in again
    replaced = suite.assemble({accelerator.SECTION: ours.replace("first run", "rerun")}, again)
    assert "rerun" in replaced and "first run" not in replaced
