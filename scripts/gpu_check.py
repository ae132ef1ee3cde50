"""``make gpu-check``: the whole GPU verification in one command, with no network.

A GPU machine lent for a few minutes has a Python (3.12) that already holds
CUDA torch, CuPy, NumPy, gRPC, pytest and friends, and cannot download
anything. This script:

1. exits 2 with "no CUDA device" when the driver reports none (before
   creating anything);
2. builds a scratch environment on top of that Python (a venv that sees its
   packages), then installs the wheels carried from the developer's machine
   (``make gpu-wheels``) and the project from the tree, all with
   ``--no-index --no-deps``;
3. checks that everything the GPU tests import, imports;
4. runs ``pytest -m gpu`` and ``benchmarks/gpu.py``, each under a time cap,
   writing logs, a JUnit report, the benchmark's JSON and plot, and a
   summary into ``--out``.

Subcommands: ``download`` (here, with network: fetch the wheels), ``prepare``
(only step 2, also used by the CPU test that proves the wheels suffice) and
``run`` (all of it). Only the standard library is used, so the GPU machine's
bare ``python3`` runs it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = ROOT / "build" / "gpu-env"

#: What the project needs beyond the GPU machine's own packages, pinned to the
#: versions CI tests with: the machine's gRPC and protobuf may be older than the
#: floor the committed generated code checks at import, and it has no health
#: or reflection services at all.
CARRIED = (
    "grpcio==1.85.3",
    "protobuf==7.36.2",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "grpcio-status==1.85.3",  # google.rpc status details of every refusal
    "googleapis-common-protos==1.76.0",  # grpcio-status's google.rpc messages
    "tbb==2023.2.0",  # numba's thread-safe threading layer for the compiled CPU kernels (not in the image)
)
#: The distributions the GPU tests rely on that the GPU machine's Python already
#: holds (its image lists them; torch there is a CUDA 13 build, CuPy is
#: cupy-cuda13x 14). The CPU test builds an environment of exactly these plus
#: the carried wheels and imports everything the GPU tests import.
DEVICE_PROVIDES = (
    "numpy",
    "ml_dtypes",
    "prometheus_client",
    "pytest",
    "iniconfig",
    "pluggy",
    "packaging",
    "pygments",
    "hypothesis",
    "sortedcontainers",
    "torch",
    "numba",
    "llvmlite",
    "filelock",
    "typing_extensions",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "fsspec",
    "setuptools",
    "pip",
)
#: Modules the GPU tests and the benchmark import (besides numpy, torch, pytest);
#: the preflight imports each and reports the versions.
IMPORTS = (
    "grpc",
    "google.protobuf",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "prometheus_client",
    "ml_dtypes",
    "hypothesis",
    "normkernels",
    "normserve.server.app",
    "normserve.tools.cli",
    "normserve.client",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PYTEST_SECONDS = 300
BENCH_SECONDS = 120


def cuda_devices() -> tuple[int, str]:
    """How many CUDA devices the driver reports, and why none when 0 (no Python package needed)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    status = libcuda.cuInit(0)
    if status != 0:
        return 0, f"the NVIDIA driver did not initialize (cuInit returned {status})"
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no device"
    return count.value, ""


def download(dest: Path, python_version: str) -> None:
    """Fetch the carried wheels (and nothing they need beyond them) for ``python_version`` on Linux x86-64."""
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(dest)]
    subprocess.run([*command, *CARRIED], check=True)


def site_dirs() -> list[str]:
    """This interpreter's package folders, in import order."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def prepare(env: Path, wheels: Path, base_sites: list[str]) -> Path:
    """A fresh venv over ``base_sites`` holding the carried wheels and the project; returns its python.

    The venv's own folder comes first on ``sys.path``, so the carried versions
    win over the base's; a ``.pth`` file appends the base folders (a venv made
    from a venv would otherwise see the bottom interpreter's packages, not the
    one holding CUDA torch).
    """
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"gpu-check: no wheels in {wheels}: run `make gpu-wheels` on a machine with network first")
    shutil.rmtree(env, ignore_errors=True)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    python = env / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own_site, "gpu-check-base.pth").write_text("".join(f"{p}\n" for p in base_sites))
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--disable-pip-version-check", "--no-cache-dir"]
    subprocess.run([*pip, *map(str, found)], check=True)
    # Built from the tree with the base's setuptools: nothing to fetch.
    subprocess.run([*pip, "--no-build-isolation", str(ROOT)], check=True)
    return python


def preflight(python: Path) -> dict:
    """Import everything the GPU tests need in the prepared environment; versions and devices."""
    probe = f"""
import importlib, json, sys
found = {{}}
for name in {list(IMPORTS)!r}:
    module = importlib.import_module(name)
    found[name] = getattr(module, "__version__", "")
import cupy, torch
found["cupy"] = cupy.__version__
found["torch"] = torch.__version__
found["torch.cuda"] = torch.cuda.is_available()
found["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
found["python"] = sys.version.split()[0]
print(json.dumps(found))
"""
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: the prepared environment cannot import what the GPU tests need:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gpu_test_files() -> list[str]:
    """The test modules that hold `gpu`-marked tests."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def timed(command: list[str], log: Path, seconds: int) -> tuple[int | str, float]:
    """Run ``command`` from the repository root with output in ``log``; (exit status or 'timed out', seconds)."""
    start = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status: int | str = process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            status = f"timed out after {seconds} s"
    return status, time.monotonic() - start


def run(out: Path, wheels: Path, pytest_seconds: int, bench_seconds: int) -> int:
    count, why = cuda_devices()
    if count == 0:
        print(f"gpu-check: no CUDA device: {why}; nothing was run", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    python = prepare(ENV_DIR, wheels, site_dirs())
    versions = preflight(python)
    print(f"gpu-check: {count} CUDA device(s); environment ready in {time.monotonic() - start:.0f} s: {versions}")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    pytest = [str(python), "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfE"]
    pytest += ["--junitxml", str(out / "pytest.xml"), *gpu_test_files()]
    tests, test_s = timed(pytest, out / "pytest.log", pytest_seconds)
    bench_cmd = [str(python), "benchmarks/gpu.py", "--json", str(out / "gpu-bench.json")]
    bench, bench_s = timed([*bench_cmd, "--plot", str(out / "gpu-bench.png")], out / "gpu-bench.log", bench_seconds)
    last_line = (out / "pytest.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
    summary = {
        "environment": versions,
        "pytest": {"status": tests, "seconds": round(test_s, 1), "result": last_line[0]},
        "benchmark": {"status": bench, "seconds": round(bench_s, 1)},
        "total_seconds": round(time.monotonic() - start, 1),
    }
    if (out / "gpu-bench.json").exists():
        summary["benchmark"]["summary"] = json.loads((out / "gpu-bench.json").read_text())["summary"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if tests == 0 and bench == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="fetch the carried wheels (needs network)")
    get.add_argument("--dest", type=Path, required=True)
    get.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    make = commands.add_parser("prepare", help="only build the environment")
    make.add_argument("--wheels", type=Path, required=True)
    make.add_argument("--env", type=Path, default=ENV_DIR)
    make.add_argument("--base-site", action="append", help="package folders to build on (default: this Python's)")
    check = commands.add_parser("run", help="the whole check (exits 2 without a CUDA device)")
    check.add_argument("--wheels", type=Path, required=True)
    check.add_argument("--out", type=Path, required=True, help="logs, reports and the summary land here")
    check.add_argument("--pytest-seconds", type=int, default=PYTEST_SECONDS)
    check.add_argument("--bench-seconds", type=int, default=BENCH_SECONDS)
    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.dest, args.python_version)
        return 0
    if args.command == "prepare":
        print(prepare(args.env, args.wheels, args.base_site or site_dirs()))
        return 0
    return run(args.out, args.wheels, args.pytest_seconds, args.bench_seconds)


if __name__ == "__main__":
    sys.exit(main())
