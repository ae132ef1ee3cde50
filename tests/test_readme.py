"""The README's Python and Node.js examples run as written (client examples against the live test server)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(server) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README has lost its quick start or its normkernels example"
    client_blocks = [code for code in blocks if "NormClient(" in code]
    assert client_blocks, "README has no client example"
    for code in blocks:
        code = code.replace("localhost:50051", server.target)  # the snippet's target is the test server
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "num_batches_tracked" in result.stdout
    assert (
        "encoder.bn1"
        in subprocess.run(
            [sys.executable, "-m", "normserve.server", "layers", "--target", server.target],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )


def test_readme_node_block_runs(server, node) -> None:
    executable, env = node
    (code,) = re.findall(r"```js\n(.*?)```", README.read_text(), flags=re.S)
    code = code.replace("localhost:50051", server.target)
    result = subprocess.run(
        [executable, "-e", code], cwd=README.parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    # The answer's tensor read whole by protobuf.js: dtype, shape, then x normalized per channel.
    assert result.stdout.startswith("FLOAT32 [ 2, 3 ] [")
    assert result.stdout.rstrip().endswith("num_batches_tracked 1")
