"""The committed generated code is exactly what `make protos` makes from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serverproc import patience

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("normalization_pb2.py", "normalization_pb2.pyi", "normalization_pb2_grpc.py")


def test_generated_code_matches_the_proto(tmp_path) -> None:
    venv = Path(sys.executable).parent.parent
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "protos", f"PROTO_OUT={tmp_path}", f"VENV={venv}"],
        check=True,
        capture_output=True,
        timeout=patience(12),
    )
    for name in GENERATED:
        fresh = (tmp_path / "normserve" / "v1" / name).read_text()
        committed = (ROOT / "protos" / "normserve" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos` and commit the result"
