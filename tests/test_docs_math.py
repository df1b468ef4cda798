"""docs/math.md is the one written form of the math: the repository cites nothing outside itself,
every citation of docs/math.md by heading names a heading that exists, and the running-sum
names of its symbol table are the ones the kernel sources use."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
# Written in pieces so that this file does not match itself.
OUTSIDE = ("shared" + "/spec", "vimpo" + "-math.md")
# docs/math.md, then a comma and a quoted heading, optionally followed on the same line by more
# quoted headings joined by a comma, " to " or " and ".
CITATION = re.compile(r'docs/math\.md, ("[^"\n]+"(?:(?:, | to | and )"[^"\n]+")*)')
ANCHOR = re.compile(r"\bmath\.md#([\w-]+)")


def _tracked_texts() -> dict[str, str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    texts = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        texts[name] = data.decode("utf-8", errors="replace")
    return texts


def _headings() -> list[str]:
    heads, fenced = [], False
    for line in MATH.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+?)\s*$", line)):
            heads.append(m.group(1))
    return heads


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_no_citation_outside_the_repository():
    bad = [f"{name}:{i}: {line.strip()}"
           for name, text in _tracked_texts().items()
           for i, line in enumerate(text.splitlines(), 1)
           if any(s in line for s in OUTSIDE)]
    assert not bad, "cite docs/math.md by heading instead:\n" + "\n".join(bad)


def test_headings_are_unique():
    heads = _headings()
    assert len(heads) == len(set(heads)), sorted(h for h in heads if heads.count(h) > 1)


def test_every_citation_names_an_existing_heading():
    heads = set(_headings())
    slugs = {_slug(h) for h in heads}
    cited, bad = 0, []
    for name, text in _tracked_texts().items():
        if name == "tests/test_docs_math.py":
            continue  # its patterns are not citations
        for i, line in enumerate(text.splitlines(), 1):
            for group in CITATION.findall(line):
                for heading in re.findall(r'"([^"]+)"', group):
                    cited += 1
                    if heading not in heads:
                        bad.append(f"{name}:{i}: {heading!r}")
            for anchor in ANCHOR.findall(line):
                if anchor not in slugs:
                    bad.append(f"{name}:{i}: #{anchor}")
    assert not bad, "no such heading in docs/math.md:\n" + "\n".join(bad)
    assert cited >= 20, f"only {cited} citations of docs/math.md found: is the pattern still right?"


def _running_sum_names() -> list[tuple[str, bool]]:
    """(name, C++ only) for each row of the "Running sums" table."""
    text = MATH.read_text().split("## Running sums", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        for name in re.findall(r"`(\w+)`", cells[0] if cells else ""):
            rows.append((name, "C++ only" in line))
    return rows


def test_running_sum_names_are_the_kernels_names():
    rows = _running_sum_names()
    assert len(rows) >= 8, rows
    cpp = "".join((ROOT / "csrc" / f).read_text() for f in
                  ("token_math.h", "logprobs_cpu.cpp", "cuda/logprobs_cuda.cu"))
    triton = (ROOT / "vimpo_kernels" / "logprobs" / "triton_kernels.py").read_text()
    has = lambda src, name: re.search(rf"\b{name}\b", src) is not None  # noqa: E731
    missing = [f"{name} (C++)" for name, _ in rows if not has(cpp, name)]
    missing += [f"{name} (Triton)" for name, cpp_only in rows if not cpp_only and not has(triton, name)]
    assert not missing, f"docs/math.md \"Running sums\" names absent from the kernels: {missing}"
