"""benchmarks/suite.py, the one command that runs the benchmarks and rewrites
docs/benchmarks.md: a real (small) MIPS benchmark run replaces its own section and keeps the
others; a failing benchmark leaves the document untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
suite = pytest.importorskip("suite")

OLD = """# Benchmarks (an older version)

<!-- bench:encoder -->
## Encoder forward
kept as it was
<!-- /bench:encoder -->

<!-- bench:mips -->
## MIPS
old figures
<!-- /bench:mips -->
"""


def test_suite_rewrites_only_the_sections_it_ran(tmp_path):
    output = tmp_path / "benchmarks.md"
    output.write_text(OLD)
    assert suite.main(["--quick", "--only", "mips", "--output", str(output),
                       "--logs", str(tmp_path / "logs")]) == 0
    text = output.read_text()
    assert text.startswith(suite.INTRO)
    encoder = "<!-- bench:encoder -->\n## Encoder forward\nkept as it was\n<!-- /bench:encoder -->\n"
    assert encoder in text and "old figures" not in text
    mips = text[text.index("<!-- bench:mips -->"):text.index("<!-- /bench:mips -->")]
    assert "python benchmarks/bench_mips.py --n 5000" in mips
    assert suite.machine() in mips  # the machine the figures came from
    rows = [line for line in mips.splitlines() if line.startswith("| exact numpy")
            or line.startswith("| exact JAX") or line.startswith("| ScaNN")]
    assert len(rows) == 3
    recall = float(rows[1].split("|")[4])  # exact device search: recall 1
    assert recall == 1.0
    # Section order follows BENCHMARKS: encoder before mips.
    assert text.index("bench:encoder") < text.index("bench:mips")


def test_failed_benchmark_leaves_the_document_unchanged(tmp_path, monkeypatch, capsys):
    output = tmp_path / "benchmarks.md"
    output.write_text(OLD)
    broken = suite.Benchmark("mips", "MIPS", "bench_mips.py", (), ("--methods", "bogus"), "")
    monkeypatch.setattr(suite, "BENCHMARKS", (broken,))
    assert suite.main(["--quick", "--output", str(output), "--logs", str(tmp_path)]) == 1
    assert output.read_text() == OLD
    assert "mips: FAILED" in capsys.readouterr().out
    assert "unknown methods" in (tmp_path / "mips.log").read_text()


def test_unknown_benchmark_is_named():
    with pytest.raises(SystemExit):
        suite.main(["--only", "nonsense"])
