"""The kernel benchmark runs end to end (tiny shapes) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_kernel_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "geometric mean time ratio ours/torch" in result.stdout
    report = json.loads(out.read_text())
    kinds = {case["kind"] for case in report["cases"]}
    assert kinds == {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"}
    assert {case["op"] for case in report["cases"]} == {"train forward", "eval forward", "train fwd+bwd"}
    assert all(case["ours_ms"] > 0 and case["torch_ms"] > 0 for case in report["cases"])
    assert report["geomean_ratio"] > 0


def test_service_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    script = SCRIPT.with_name("service.py")
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "median ratio vs floor" in result.stdout
    report = json.loads(out.read_text())
    assert {row["op"] for row in report["rows"]} == {"Train", "Infer", "Gradient"}
    assert all(row["normserve_ms"] > 0 and row["echo_ms"] > 0 for row in report["rows"])
    assert report["store_write_ms"]["full"] > 0
