"""docs/distributed.md stays true: its support matrix is the generated one, its files exist, and its
torchrun command runs as written and prints what the page shows."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from launch import run_launcher

from optitrainer.registry import KNOWN_PLUGINS
from optitrainer.support_matrix import matrix_in, render_markdown, support_matrix

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "distributed.md"
TORCHRUN_COMMAND = "torchrun --standalone --nproc_per_node 2 examples/distributed/train.py"
RANK_LINE = re.compile(
    r"\[rank (?P<rank>\d+)/(?P<world>\d+)\] engine=(?P<engine>.+?) optim=(?P<optim>\S+) steps=(?P<steps>\d+) "
    r"loss=(?P<loss>\S+) accelerator_processes=(?P<procs>\d+) weights_checksum=(?P<checksum>-?[\d.]+)"
)


def _blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, line continuations joined."""
    return [
        (lang, body.replace("\\\n", " "))
        for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    ]


def _missing_plugin_distributions() -> list[str]:
    missing = []
    for dist in sorted(set(KNOWN_PLUGINS.values())):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    return missing


def test_doc_matrix_is_the_generated_one():
    missing = _missing_plugin_distributions()
    if missing:
        pytest.skip(f"the doc's matrix covers every plugin of plugins/; not installed: {', '.join(missing)}")
    rows = [r for r in support_matrix() if r.provenance.distribution != "<in-process>"]
    expected = render_markdown(rows)
    assert matrix_in(DOC.read_text(encoding="utf-8")) == expected, (
        "docs/distributed.md's support matrix differs from the plugins' capabilities: run "
        "`optitrainer matrix --write docs/distributed.md` (or paste `optitrainer matrix --markdown` between "
        "<!-- matrix:start --> and <!-- matrix:end -->)"
    )


def test_doc_links_to_files_that_exist():
    text = DOC.read_text(encoding="utf-8")
    linked = re.findall(r"\]\((\.\./[^)#]+)\)", text)
    assert linked, "no relative links found"
    for target in linked:
        assert (DOC.parent / target).exists(), f"docs/distributed.md links to {target}, which does not exist"
    for path in re.findall(r"examples/distributed/[\w.]+", text):
        assert (ROOT / path).exists(), f"docs/distributed.md names {path}, which does not exist"


def test_documented_torchrun_command_runs_and_prints_what_the_doc_shows(tmp_path):
    blocks = _blocks(DOC.read_text(encoding="utf-8"))
    index = next(i for i, (lang, body) in enumerate(blocks) if body.strip().startswith(TORCHRUN_COMMAND))
    argv = shlex.split(blocks[index][1])
    expected = [m.groupdict() for m in RANK_LINE.finditer(blocks[index + 1][1])]
    assert len(expected) == 2, "the doc shows no rank lines after its torchrun command"
    argv[0] = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    argv = [str(ROOT / a) if a.startswith("examples/") else a for a in argv]  # tests run in a tmp dir
    proc = run_launcher(argv, timeout=240)
    got = sorted((m.groupdict() for m in RANK_LINE.finditer(proc.output)), key=lambda d: d["rank"])
    assert [d["rank"] for d in got] == ["0", "1"], f"not every rank finished:\n{proc.output[-3000:]}"
    assert got[0]["checksum"] == got[1]["checksum"], "the ranks hold different weights"
    for line, doc in zip(got, sorted(expected, key=lambda d: d["rank"])):
        for key in ("world", "engine", "optim", "steps", "loss", "procs"):
            assert line[key] == doc[key], (
                f"rank {line['rank']} printed {key}={line[key]}, the doc shows {doc[key]}"
            )
        assert float(line["checksum"]) == pytest.approx(float(doc["checksum"]), abs=1e-3)
