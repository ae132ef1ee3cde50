"""The examples run as a newcomer runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from serverproc import patience

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_digits_quick_run_starts_its_own_server_and_reports(tmp_path):
    plot = tmp_path / "digits.png"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), "--quick", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=patience(30),  # 68 s wall (29 s of CPU) measured with the 2-core machine at load average 10
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    accuracies = re.findall(r"^  (.+?)\s+final test accuracy\s+([\d.]+)%", done.stdout, re.MULTILINE)
    assert [label for label, _ in accuracies] == [
        "no batch norm, lr 0.01",
        "batch norm (normserve), lr 0.01",
        "no batch norm, lr 0.1",
        "batch norm (normserve), lr 0.1",
    ]
    assert all(0 <= float(value) <= 100 for _, value in accuracies)
    gaps = [float(g) for g in re.findall(r"largest relative gap in epoch loss (\S+)", done.stdout)]
    assert len(gaps) == 2
    assert max(gaps) < 1e-4  # the remote layers train as torch's do
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
