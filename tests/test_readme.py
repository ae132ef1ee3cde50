"""The README's and the docs pages' examples run as written, twice in a row (client examples against the live test
server), and every relative link in them leads to a file of the repository."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys
from pathlib import Path

from serverproc import patience

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(language: str) -> list[tuple[Path, str]]:
    return [(page, code) for page in PAGES for code in re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)]


def test_readme_and_docs_python_blocks_run(server) -> None:
    blocks = _blocks("python")
    readme = [code for page, code in blocks if page == README]
    assert len(readme) >= 2, "the README has lost its quick start or its PyTorch example"
    assert any("NormClient(" in code for code in readme), "the README has no client example"

    def run_twice(page: Path, code: str) -> None:
        code = code.replace("localhost:50051", server.target)  # the snippet's target is the test server
        for run in ("first", "second"):  # a reader runs a snippet again: it must not collide with its first run
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=patience(12))
            assert result.returncode == 0, f"{page.name}, {run} run: {result.stderr}"
            assert "num_batches_tracked" in result.stdout, page.name

    # Two blocks at a time: each is mostly a fresh interpreter importing torch, one core's work. Blocks use
    # layer names of their own, so running side by side is what two readers at once would do.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(run_twice, page, code) for page, code in blocks]:
            done.result()
    assert (
        "encoder.bn1"
        in subprocess.run(
            [sys.executable, "-m", "normserve.server", "layers", "--target", server.target],
            capture_output=True,
            text=True,
            timeout=patience(6),
        ).stdout
    )


def test_docs_node_block_runs(server, node) -> None:
    executable, env = node
    ((page, code),) = _blocks("js")
    code = code.replace("localhost:50051", server.target)
    result = subprocess.run(
        [executable, "-e", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=patience(12)
    )
    assert result.returncode == 0, f"{page.name}: {result.stderr}"
    # The answer's tensor read whole by protobuf.js: dtype, shape, then x normalized per channel.
    assert result.stdout.startswith("FLOAT32 [ 2, 3 ] [")
    assert result.stdout.rstrip().endswith("num_batches_tracked 1")


def test_relative_links_lead_to_files() -> None:
    for page in [*PAGES, ROOT / "SECURITY.md", ROOT / "deploy" / "nginx" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which is missing"


def test_the_front_page_stays_short() -> None:
    assert README.read_text().count("\n") <= 200, "move detail into docs/ (the README is the five-minute read)"
