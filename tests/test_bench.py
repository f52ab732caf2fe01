"""The benchmark scripts the README quotes, each run on a tiny model the way a user runs it (its command line, a
fresh process, a scratch folder), so that a change to the package cannot leave one of them broken unnoticed.
What each one measures is not asserted (speed is noise here); what it reports must be complete and consistent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2scratch.config import resolve_config

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from train_speed import ceiling_product_shapes  # noqa: E402  (the benchmark's shapes, tested here)


def run_bench(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_train_speed_reports_every_variant_below_the_measured_ceiling(tmp_path):
    out = tmp_path / "train_speed.json"
    run_bench(
        "train_speed.py",
        *("--preset", "tiny", "--drop-rate", "0", "0.1", "--precision", "fp32", "bf16"),
        *("--rounds", "1", "--steps", "1", "--warmup", "1", "--out", str(out)),
        cwd=tmp_path,
    )
    results = json.loads(out.read_text())["results"]
    settings = {(r["precision"], r["drop_rate"], r["side"]) for r in results}
    assert settings == {(p, d, s) for p in ("fp32", "bf16") for d in (0.0, 0.1) for s in ("ours", "transformers")}
    for row in results:
        assert row["ms_per_step"] > 0
        # the ceiling is the fastest of the step's own products: a step of a tiny model cannot reach it
        assert 0 < row["mfu"] < 1, row
        assert (row["ratio"] is not None) == (row["side"] == "ours")


def test_ceiling_shapes_are_the_steps_products():
    shapes = ceiling_product_shapes(resolve_config("gpt2").model, batch_size=2)
    assert shapes[0] == (2048, 2048, 2048, "nn")
    rows = 2 * 1024
    # the LM head's forward, input gradient and weight gradient, the vocabulary padded to 50,304, in the layouts
    # F.linear's forward and backward give them
    assert {(rows, 768, 50304, "nt"), (rows, 50304, 768, "nn"), (50304, rows, 768, "tn")} <= set(shapes)
    assert (rows, 3072, 768, "nt") in shapes and (rows, 3072, 768, "nn") in shapes and (3072, rows, 768, "tn") in shapes
    assert (rows, 768, 768, "nt") in shapes and (rows, 768, 768, "nn") in shapes
    assert len(shapes) == 1 + 15 and len(set(shapes)) == len(shapes)


def test_cpu_step_parts_accounts_for_the_step(tmp_path):
    out = run_bench(
        "cpu_step_parts.py",
        *("--preset", "tiny", "--rounds", "1", "--steps", "1", "--repeats", "1", "--warmup", "1"),
        cwd=tmp_path,
    )
    for line in ("the whole step (ours)", "attention", "LM head + loss", "AdamW update", "rest of the step"):
        assert line in out
    assert "1.5x transformers" in out and "40% of the matmul rate" in out


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("attention_speed.py", ["--heads", "2", "--context", "128", "--head-size", "16", "--repeats", "1"], "math"),
        ("profile_train_step.py", ["--preset", "tiny", "--steps", "1", "--warmup", "1", "--rows", "5"], "Self CPU"),
    ],
)
def test_bench_script_runs(tmp_path, script, args, expected):
    assert expected in run_bench(script, *args, cwd=tmp_path)


def test_generate_speed_greedy_tokens_equal_transformers(tmp_path):
    out = run_bench(
        "generate_speed.py",
        *("--preset", "tiny", "--rounds", "1", "--new-tokens", "6", "--prompt-tokens", "8", "--batches", "1", "2"),
        *("--dtypes", "fp32"),
        cwd=tmp_path,
    )
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2 and all(row[-1] == "True" for row in rows), out
