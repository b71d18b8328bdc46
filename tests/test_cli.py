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


def test_list_piped_to_a_file_keeps_every_summary_whole(tmp_path):
    """`optitrainer list > file` is not cut at a terminal's width (it was, at 140 columns)."""
    import subprocess
    import sys

    from optitrainer import list_optimizers

    with open(tmp_path / "list.txt", "w") as f:
        subprocess.run([sys.executable, "-m", "optitrainer.cli", "list"], stdout=f, check=True, env=None)
    text = (tmp_path / "list.txt").read_text()
    long = [r for r in list_optimizers() if not r.error and len(r.summary) > 60]
    assert long, "no summary longer than the 60 columns a terminal gives it"
    for r in long:
        assert r.summary in text, r.name


def test_info_shows_typed_options_and_defaults(cli):
    out = cli("info", "sgd")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "provided by: optitrainer 0.1.0" in text and "modes: standard, sgd_layerwise" in text
    assert (
        "momentum" in text and "float in [0, inf), finite" in text and "nesterov" in text and "False" in text
    )


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


def test_info_has_a_distributed_section_with_engines_and_reasons(cli):
    text = cli("info", "galore_adamw").stdout
    section = text[text.index("Distributed") :]
    assert "galore_adamw: DDP" in section and "galore_adamw_layerwise: DDP" in section
    assert "refused under DeepSpeed ZeRO-0/1/2/3, FSDP1/2: the projection needs each weight whole" in section


def test_info_distributed_section_of_a_layerwise_form(cli):
    text = cli("info", "adamw_torch_layerwise").stdout
    assert "adamw_torch: DDP, DeepSpeed ZeRO-0/1/2/3, FSDP1/2" in text
    assert "adamw_torch_layerwise: DDP, FSDP2" in text
    assert (
        "refused under DeepSpeed ZeRO-0/1/2/3: layerwise mode steps each parameter from its gradient hook"
        in text
    )
    assert "refused under FSDP1: layerwise mode" in text


def test_list_engine_filters_names_that_train_there(cli):
    out = cli("list", "--engine", "ZeRO-3")
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("│ ")}
    assert "adamw_torch" in rows and "sgd" in rows
    assert "muon" not in rows and "galore_adamw" not in rows and "adalomo" not in rows
    assert "layerwise" not in rows["adamw_torch"]  # its layerwise form is refused under ZeRO-3
    fsdp2 = cli("list", "--engine", "fsdp2").stdout
    row = next(line for line in fsdp2.splitlines() if line.startswith("│ adamw_torch "))
    assert "standard, layerwise" in row


def test_list_engine_rejects_unknown_engines(cli, capsys):
    with pytest.raises(SystemExit) as exc:
        cli("list", "--engine", "zero9")
    assert exc.value.code == 2
    assert "use one of ddp, zero0, zero1, zero2, zero3, fsdp1, fsdp2" in capsys.readouterr().err


def _markdown_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    return {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]] for line in lines}


def test_matrix_markdown(cli):
    out = cli("matrix", "--markdown")
    assert out.returncode == 0, out.stderr
    assert "| `optim=` | DDP | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 | FSDP1 | FSDP2 |" in out.stdout
    rows = _markdown_rows(out.stdout)
    columns = ["DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "FSDP1", "FSDP2"]
    lw = dict(zip(columns, rows["adamw_torch_layerwise"]))
    assert lw["DDP"] == "✓" and lw["FSDP2"] == "✓" and lw["ZeRO-2"] == "✗" and lw["FSDP1"] == "✗"
    assert rows["adamw_torch"] == ["✓"] * 7
    assert rows["muon"] == ["✓"] + ["✗"] * 6
    assert "muon_layerwise" not in rows  # muon cannot run layerwise
    assert "galore_adamw_layerwise" in rows
    # every ✗ has its reason, once per reason
    assert (
        "- Newton-Schulz orthogonalizes whole 2-D weights; ZeRO flattens and FSDP shards them: `muon` (ZeRO-0/1/2/3, FSDP1/2)"
        in out.stdout
    )


def test_matrix_terminal_table_and_names(cli):
    out = cli("matrix", "muon", "sgd_layerwise")
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("│ ")}
    assert set(rows) == {"muon", "sgd", "sgd_layerwise"}
    assert rows["muon"].count("✓") == 1 and rows["muon"].count("✗") == 6
    assert rows["sgd_layerwise"].count("✓") == 2
    assert cli("matrix", "sgdd").returncode == 2


def test_matrix_write_rewrites_between_the_markers(cli, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# title\n\n<!-- matrix:start -->\nold\n<!-- matrix:end -->\n\nafter\n")
    assert cli("matrix", "--write", str(doc)).returncode == 0
    text = doc.read_text()
    assert (
        "old" not in text and text.startswith("# title\n") and text.endswith("<!-- matrix:end -->\n\nafter\n")
    )
    assert "| `adamw_torch_layerwise` | ✓ |" in text
    once = text
    cli("matrix", "--write", str(doc))
    assert doc.read_text() == once  # idempotent
    (tmp_path / "bare.md").write_text("no markers\n")
    assert cli("matrix", "--write", str(tmp_path / "bare.md")).returncode == 2


def test_support_matrix_imports_no_upstream_package():
    import sys

    from optitrainer.registry import REGISTRY
    from optitrainer.support_matrix import support_matrix

    upstream = {m.split(".")[0] for info in REGISTRY.list() if not info.error for m in _imports(info.name)}
    before = {m for m in upstream if m in sys.modules}
    rows = support_matrix()
    assert {m for m in upstream if m in sys.modules} == before
    assert {r.name for r in rows} >= {"adamw_torch", "adamw_torch_layerwise", "galore_adamw_layerwise"}


def _imports(name: str) -> tuple[str, ...]:
    from optitrainer.registry import REGISTRY

    return REGISTRY.resolve(name, check_installed=False).spec.imports


def test_support_matrix_cells_carry_the_trainers_refusal():
    from optitrainer.support_matrix import support_matrix

    rows = {r.name: r for r in support_matrix(["muon", "sgd"])}
    assert set(rows) == {"muon", "sgd", "sgd_layerwise"}
    cell = rows["muon"].cells["zero3"]
    assert not cell.supported and cell.why.startswith("Newton-Schulz")
    assert (
        cell.refusal.startswith("DeepSpeed ZeRO-3 training: muon supports DDP (")
        and "(from" not in cell.refusal
    )
    assert rows["sgd_layerwise"].engines == {"ddp", "fsdp2"}
    assert rows["sgd"].cells["fsdp1"].refusal is None


def test_info_of_a_transformers_only_name_refuses_no_engine(cli):
    text = cli("info", "adamw_anyprecision").stdout
    assert "Distributed: no engine is refused; transformers decides" in text


# --- listing many names: filters, JSON, the recommended learning rate --------------------------------


def test_list_format_json_gives_every_name_with_its_facts(cli):
    import json

    out = cli("list", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    from optitrainer.registry import REGISTRY

    assert set(rows) == set(REGISTRY.names())
    adamw = rows["adamw_torch"]
    assert adamw["distribution"] == "optitrainer" and adamw["version"] == "0.1.0"
    assert adamw["modes"] == ["standard", "layerwise"] and adamw["recommended_lr"] is None
    assert adamw["capabilities"]["engines"] == ["ddp", "zero0", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"]
    assert adamw["capabilities"]["gradient_accumulation"] is True and adamw["capabilities"]["fp16"] is True
    lomo = rows["adalomo"]
    assert lomo["modes"] == ["standard"] and lomo["capabilities"]["owns_backward"] is True
    assert lomo["capabilities"]["gradient_accumulation"] is False and lomo["capabilities"]["engines"] == [
        "ddp"
    ]
    assert rows["schedule_free_radam"]["aliases"] == ["schedule_free_radamw"]
    assert adamw["capabilities"]["changes_trainable"] is False
    assert adamw["learning_rate_range"] is None
    if "prodigy" in rows:
        assert rows["prodigy"]["learning_rate_range"] == [0.2, 50.0]
    if "badam" in rows:  # the plugin whose blocks change which parameters train: DDP through the trainer
        assert rows["badam"]["capabilities"]["changes_trainable"] is True
        assert rows["badam"]["capabilities"]["engines"] == ["ddp"]


def test_list_filters_by_distribution_capability_and_text(cli):
    def names(*argv):
        out = cli("list", *argv, "--format", "names")
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    assert names("--dist", "optitrainer-lomo") == {"lomo", "adalomo"}
    assert names("--dist", "optitrainer_LOMO") == {"lomo", "adalomo"}
    assert names("--capability", "fused-backward") >= {"lomo", "adalomo"}
    assert "adamw_torch" not in names("--capability", "fused-backward")
    layerwise = names("--capability", "layerwise")
    assert "adamw_torch" in layerwise and "muon" not in layerwise and "adalomo" not in layerwise
    zero3 = names("--capability", "ZeRO-3")
    assert "adamw_torch" in zero3 and "muon" not in zero3
    assert names("--capability", "train/eval") >= {"schedule_free_adamw", "schedule_free_sgd"}
    assert names("--grep", "schedule-free", "--dist", "optitrainer-schedulefree") == {
        "schedule_free_adamw",
        "schedule_free_radam",
        "schedule_free_sgd",
    }
    # the core's Muon is not layerwise (a bridge's per-parameter Muon may be)
    assert names("--capability", "layerwise", "--grep", "orthogonal", "--dist", "optitrainer") == set()
    table = cli("list", "--dist", "optitrainer-lomo").stdout
    assert "2 of " in table and "names from 1 distribution(s)" in table


def test_list_stays_cheap_with_filters_and_json():
    import subprocess
    import sys

    code = (
        "import sys, io, contextlib\n"
        "from optitrainer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['list']); main(['list', '--format', 'json']); main(['list', '--capability', 'zero2', '--grep', 'adam'])\n"
        "    main(['info', 'sgd'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_info_shows_the_recommended_learning_rate(cli):
    import dataclasses

    from kit_defects import specs

    from optitrainer import register
    from optitrainer.registry import REGISTRY

    register(
        dataclasses.replace(
            specs.SGD_MOMENTUM, name="kd_info_lr", recommended_lr=1.0, learning_rate_range=(0.5, 2.0)
        ),
        replace=True,
    )
    try:
        info = cli("info", "kd_info_lr").stdout
        assert "recommended learning rate: 1" in info
        assert (
            "learns at learning rates 0.5 to 2 (measured: optitrainer check kd_info_lr --measure-lr)" in info
        )
        assert "recommended learning rate: none declared" in cli("info", "sgd").stdout
        row = next(line for line in cli("list").stdout.splitlines() if line.startswith("│ kd_info_lr "))
        assert "│ 1 " in row
    finally:
        REGISTRY.unregister("kd_info_lr")


# --- optitrainer check ----------------------------------------------------------------------------


def test_check_unknown_name_suggests_and_fails(cli):
    out = cli("check", "adamw_troch")
    assert out.returncode == 2 and "Did you mean: 'adamw_torch'" in out.stdout
    assert cli("check").returncode == 2
    assert cli("check", "sgd", "--checks", "lerns").returncode == 2


def test_check_prints_each_result_and_fails_on_a_defect(cli):
    from kit_defects import specs

    from optitrainer import register
    from optitrainer.registry import REGISTRY

    ok = cli("check", "sgd", "--checks", "imports,options,refusals")
    assert ok.returncode == 0, ok.stdout
    assert "passed  sgd options: momentum=0.5 reaches the optimizer's hyperparameters" in ok.stdout
    assert "passed  sgd_layerwise refusals" in ok.stdout and "0 failed" in ok.stdout
    register(specs.DEAD_OPTION, replace=True)
    try:
        bad = cli("check", "kd_dead_option", "--checks", "options,refusals")
    finally:
        REGISTRY.unregister("kd_dead_option")
    assert bad.returncode == 1, bad.stdout
    assert "failed  kd_dead_option options: kd_dead_option: option(s) that change nothing" in bad.stdout
    assert "dampening (tried 0.5" in bad.stdout and "1 failed" in bad.stdout
