"""`make gpu-check` on a machine without a GPU, and the wheels it carries to one that has no network.

The GPU machine's Python holds CUDA torch and CuPy but cannot download: what
the project needs beyond its packages travels as wheels (`make gpu-wheels`).
Here an environment is built of exactly the packages that machine provides
(`gpu_check.DEVICE_PROVIDES`, linked from this environment) plus the carried
wheels installed with `pip install --no-index`, the way `make gpu-check` builds
one there, and everything the GPU tests import must import in it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-C", str(ROOT), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


def test_gpu_check_refuses_cleanly_without_a_cuda_device(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # No visible device, also on a machine that has one: the driver then reports none.
    done = make("gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_CHECK_OUT={out}", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2, done.stderr
    assert "gpu-check: no CUDA device: " in done.stderr
    assert not out.exists(), "nothing is built or written without a device"
    direct = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "run", "--wheels", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert direct.returncode == 2
    assert "nothing was run" in direct.stderr


def test_gpu_wheels_are_built_for_the_gpu_machines_python(tmp_path: Path) -> None:
    done = make("gpu-wheels", f"GPU_WHEELS={tmp_path}")
    assert done.returncode == 0, done.stderr
    wanted = {canonicalize_name(pin.split("==")[0]): pin.split("==")[1] for pin in gpu_check.CARRIED}
    found = {}
    for wheel in tmp_path.glob("*.whl"):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        found[name] = str(version)
        assert any(t.interpreter in ("py3", "cp312") or (t.abi == "abi3" and t.interpreter <= "cp312") for t in tags), (
            f"{wheel.name} is not for CPython 3.12"
        )
        assert all(t.platform == "any" or t.platform.endswith("x86_64") for t in tags), f"{wheel.name}: not x86-64"
    assert found == wanted


def _device_site(folder: Path) -> Path:
    """A package folder holding only what the GPU machine's Python provides (links into this environment)."""
    folder.mkdir()
    for name in gpu_check.DEVICE_PROVIDES:
        dist = importlib.metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source, link = Path(dist.locate_file(top)), folder / top
            if source.exists() and not link.exists():
                link.symlink_to(source)
    return folder


def test_the_carried_wheels_alone_satisfy_what_the_gpu_tests_import(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    gpu_check.download(wheels, f"{sys.version_info.major}.{sys.version_info.minor}")  # the same pins, for here
    base = _device_site(tmp_path / "device-site")
    python = gpu_check.prepare(tmp_path / "env", wheels, [str(base)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def inside(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)

    imports = inside("-c", f"import importlib; [importlib.import_module(m) for m in {list(gpu_check.IMPORTS)!r}]")
    assert imports.returncode == 0, imports.stderr
    # The carried versions win over any the base holds.
    versions = inside("-c", "import grpc, google.protobuf as p; print(grpc.__version__, p.__version__)")
    assert versions.stdout.split() == [pin.split("==")[1] for pin in gpu_check.CARRIED[:2]]
    files = gpu_check.gpu_test_files()
    assert {"tests/test_gpu.py", "tests/test_gpu_fused.py"} <= set(files)
    collected = inside("-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert re.search(r"\b[1-9]\d* tests? collected", collected.stdout), collected.stdout[-500:]
    served = subprocess.run([str(python.with_name("normserve")), "serve", "--help"], capture_output=True, text=True)
    assert served.returncode == 0, served.stderr
