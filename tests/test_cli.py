"""The ``optitrainer`` command line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from optitrainer.cli import main


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")

    def run(*argv: str) -> SimpleNamespace:
        code = main(list(argv))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def test_list_shows_names_modes_provenance_and_summary(cli):
    out = cli("list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith("│ adamw_torch "))
    assert (
        "standard, layerwise" in row
        and "optitrainer 0.1.0" in row
        and "yes" in row
        and "torch.optim.AdamW" in row
    )
    muon = next(line for line in lines if line.startswith("│ muon "))
    assert "layerwise" not in muon


def test_info_shows_typed_options_and_defaults(cli):
    out = cli("info", "sgd")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "provided by: optitrainer 0.1.0" in text and "modes: standard, sgd_layerwise" in text
    assert "momentum" in text and "float in [0, inf]" in text and "nesterov" in text and "False" in text


def test_info_unknown_name_suggests_and_fails(cli):
    out = cli("info", "sgdd")
    assert out.returncode == 2
    assert "Did you mean: 'sgd'" in out.stdout


def test_seed_plugins_are_listed_with_their_distribution(cli):
    out = cli("list").stdout
    expected = {
        "galore_adamw": "optitrainer-galore",
        "apollo_mini": "optitrainer-apollo",
        "adalomo": "optitrainer-lomo",
        "schedule_free_radam": "optitrainer-schedulefree",
        "stable_adamw": "optitrainer-optimi",
        "grokadamw": "optitrainer-grokadamw",
    }
    for name, dist in expected.items():
        row = next((line for line in out.splitlines() if line.startswith(f"│ {name} ")), None)
        assert row is not None, f"{name} not listed"
        assert f"{dist} 0.1.0" in row, row
    assert "Plugins not installed" not in out


def test_info_galore_shows_its_options_table(cli):
    text = cli("info", "galore_adamw").stdout
    assert "provided by: optitrainer-galore 0.1.0" in text
    for key in ("rank", "update_proj_gap", "scale", "proj_type"):
        assert f"│ {key} " in text
    assert "128" in text and "200" in text and "0.25" in text and "'std'" in text
