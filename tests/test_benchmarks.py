"""The kernel benchmark runs end to end (tiny shapes) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serverproc import patience

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def quick(script: str, *args: str) -> subprocess.CompletedProcess:
    """``benchmarks/<script> --quick ARGS``, which must succeed."""
    command = [sys.executable, str(SCRIPT.with_name(script)), "--quick", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=patience(30))
    assert result.returncode == 0, result.stderr
    return result


def test_kernel_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    result = quick("kernels.py", "--json", str(out))
    assert "geometric mean time ratio ours/torch" in result.stdout
    report = json.loads(out.read_text())
    kinds = {case["kind"] for case in report["cases"]}
    assert kinds == {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "layer_norm_2d"}
    assert {case["op"] for case in report["cases"]} == {"train forward", "eval forward", "train fwd+bwd"}
    assert all(case["ours_ms"] > 0 and case["torch_ms"] > 0 for case in report["cases"])
    assert report["geomean_ratio"] > 0


def _check_service_report(report: dict) -> None:
    assert {row["op"] for row in report["rows"]} == {"Train", "Infer", "Gradient"}
    for row in report["rows"]:
        assert set(row["ms"]) == {"bytes", "stream", "shm", "echo", "echo-stream", "auto"}
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["ratio_vs_floor"]["auto"] > 0
    summary = report["summary"]
    assert set(summary["small_call_p50_vs_echo"]) == {"Train", "Infer", "Gradient"}
    assert summary["concurrent_throughput_vs_echo"]["4 KB"] > 0
    assert summary["shm_speedup_vs_bytes"]["64 KB"] > 0


def test_service_benchmark_quick_mode(tmp_path: Path) -> None:
    out, png = tmp_path / "service.json", tmp_path / "service.png"
    result = quick("service.py", "--json", str(out), "--plot", str(png), "--concurrency-seconds", "1")
    assert "| Infer | 64 KB |" in result.stdout
    report = json.loads(out.read_text())
    _check_service_report(report)
    assert report["store_write_ms"]["full"] > 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_small_calls_benchmark_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "small_calls.json"
    result = quick("small_calls.py", "--json", str(out))
    assert "layer.infer" in result.stdout
    report = json.loads(out.read_text())
    assert set(report["calls"]) == {"layer.infer", "client.call", "raw callable", "GetLayer", "Health", "echo"}
    assert all(row["ms"]["median"] > 0 for row in report["calls"].values())
    assert report["calls"]["echo"]["per_echo"]["median"] == 1.0


def test_normserve_bench_against_a_running_server(start_server, tmp_path: Path) -> None:
    from serverproc import NORMSERVE

    proc = start_server("--shared-memory")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [NORMSERVE, "bench", "--target", proc.target, "--quick", "--json", str(out), "--plot", str(png)]
    result = subprocess.run(
        [*command, "--concurrency-seconds", "1"], capture_output=True, text=True, timeout=patience(30)
    )
    assert result.returncode == 0, result.stderr
    assert f"normserve {proc.target} vs echo" in result.stdout
    assert "bench: 90 of 90 rounds" in result.stderr  # progress, on stderr only
    assert "rounds" not in result.stdout
    _check_service_report(json.loads(out.read_text()))
    assert png.stat().st_size > 10_000

    # Captured as one stream (`2>&1 | tee log`): each row of the table stays one whole line.
    merged = subprocess.run(
        [*command, "--concurrency-seconds", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=patience(30),
    )
    assert merged.returncode == 0, merged.stdout
    assert "\r" not in merged.stdout
    rows = [line for line in merged.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 6  # the header, its rule, 3 ops x 2 sizes
    assert all(line.count("|") == 11 and line.endswith("|") for line in rows), rows


@pytest.mark.parametrize("quick", [True, False])
def test_bench_plot_tick_labels_do_not_overlap(quick: bool) -> None:
    from normserve.tools import bench

    rng = np.random.default_rng(7)
    sizes = [nbytes for nbytes, _ in (bench.QUICK if quick else bench.SIZES)]
    names = ("bytes", "stream", "shm", "echo", "echo-stream")
    rows = [
        {"op": op, "x_bytes": nbytes, "ms": {n: float(nbytes / 1e6 * rng.uniform(0.5, 2) + 0.2) for n in names}}
        for op in bench.OPS
        for nbytes in sizes
    ]
    fig = bench.figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            overlapping = [
                (labels[i].get_text(), labels[j].get_text())
                for i in range(len(boxes))
                for j in range(i + 1, len(boxes))
                if boxes[i].overlaps(boxes[j])
            ]
            assert overlapping == [], ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == [bench._label(n) for n in sizes]


def test_gpu_benchmark_runs_on_a_gpu_and_refuses_cleanly_without_one(tmp_path: Path) -> None:
    script = SCRIPT.parent / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_benchmark", script)
    gpu_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_benchmark)
    missing = gpu_benchmark.missing_requirements()  # no CuPy, no device, or a CPU build of torch
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out), "--plot", str(tmp_path / "gpu.png")],
        capture_output=True,
        text=True,
        timeout=patience(60),
    )
    if missing:
        assert result.returncode == 2, result.stderr
        assert f"{missing}: nothing measured" in result.stderr
        assert not out.exists()
        return
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert {row["op"] for row in report["rows"]} == {"train forward", "eval forward", "backward"}
    assert len({row["kind"] for row in report["rows"]}) == 5
    assert all(row["ours_ms"] > 0 and row["torch_ms"] > 0 for row in report["rows"])
    assert report["summary"]["copy_bandwidth_gbps"] > 0


def test_training_benchmark_quick_mode(tmp_path: Path) -> None:
    out, png = tmp_path / "training.json", tmp_path / "training.png"
    quick("training.py", "--json", str(out), "--plot", str(png))
    report = json.loads(out.read_text())
    assert [row["case"] for row in report["rows"]] == ["mlp-256x512", "conv-32x64x16x16"]
    for row in report["rows"]:
        assert set(row["ms"]) == {
            "torch",
            "echo",
            "small echo",
            "remote",
            "sync x1",
            "sync x4",
            "stats",
            "stats sync x1",
            "stats sync x4",
        }
        assert all(ms > 0 for ms in row["ms"].values())
    assert png.read_bytes().startswith(b"\x89PNG")


def test_cluster_benchmark_quick_mode(tmp_path: Path) -> None:
    from normserve.tools.nginx import NginxMissing, find_nginx

    try:
        find_nginx()
    except NginxMissing as missing:
        pytest.skip(f"benchmarks/cluster.py runs nginx: {missing}")
    out = tmp_path / "cluster.json"
    result = quick("cluster.py", "--json", str(out))
    assert "through nginx" in result.stdout
    report = json.loads(out.read_text())
    assert [(row["path"], row["replicas"]) for row in report["throughput"]] == [
        ("direct", 1),
        ("nginx", 1),
        ("nginx", 2),
    ]
    for row in report["throughput"]:
        assert row["calls_per_s"] > 0
        assert row["server_cpu_ms_per_call"] > 0
        assert (row["nginx_cpu_ms_per_call"] > 0) == (row["path"] == "nginx")
    assert report["small_call_ms"]["nginx"] > 0
    assert report["paper"]["nginx_calls_per_core_s"] > 0
