"""The registry: entry-point discovery, laziness, aliases, modes, provenance, failures, switches."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fakedist import plugin_source

from optitrainer import (
    OptimizerNotInstalledError,
    PluginLoadError,
    UnknownOptimizerError,
    get_optimizer,
    list_optimizers,
)
from optitrainer import registry as registry_mod
from optitrainer.plugin import Capabilities, OptimizerSpec
from optitrainer.registry import DISABLE_AUTOLOAD_ENV, Registry

BUILTINS = {"adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor", "muon"}


def _sgd_factory(ctx):
    import torch

    return torch.optim.SGD(ctx.param_groups(), lr=ctx.lr)


def test_builtins_come_from_the_core_entry_points():
    rows = {r.name: r for r in list_optimizers()}
    assert BUILTINS <= set(rows)
    for name in BUILTINS:
        assert rows[name].provenance.distribution == "optitrainer"
        assert rows[name].provenance.version
        assert rows[name].installed
        assert rows[name].summary


def test_listing_imports_no_upstream_optimizer_package():
    code = (
        "import sys, optitrainer; rows = optitrainer.list_optimizers(); "
        "heavy = ['galore_torch', 'apollo_torch', 'lomo_optim', 'schedulefree', 'optimi', 'grokadamw', 'bitsandbytes']; "
        "loaded = [m for m in heavy if m in sys.modules]; "
        "assert not loaded, loaded; print(len(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= len(BUILTINS)


def test_plugin_from_a_distribution_with_provenance_and_alias(fake_dists):
    fake_dists(
        "fake-plugin",
        "2.3.4",
        {"fakeplug_sgd": "fakeplug_a:SPEC"},
        {"fakeplug_a": plugin_source(("SPEC", "fakeplug_sgd", "aliases=('fp_sgd',)"))},
    )
    reg = Registry()
    r = reg.resolve("fakeplug_sgd")
    assert (r.provenance.distribution, r.provenance.version) == ("fake-plugin", "2.3.4")
    assert reg.resolve("fp_sgd").spec.name == "fakeplug_sgd"
    assert reg.resolve("fp_sgd").name == "fakeplug_sgd"


def test_layerwise_suffix_is_a_mode_of_capable_optimizers():
    r = get_optimizer("adamw_torch_layerwise")
    assert r.layerwise and r.spec.name == "adamw_torch" and r.name == "adamw_torch_layerwise"
    with pytest.raises(UnknownOptimizerError, match=r"'muon'.*cannot run layerwise.*adamw_torch_layerwise"):
        get_optimizer("muon_layerwise")


def test_duplicate_names_from_two_distributions_are_reported_by_name(fake_dists):
    src = plugin_source(("SPEC", "fakeplug_dup", "aliases=('fp_dup',)"))
    fake_dists("fake-one", "1.0", {"fakeplug_dup": "fakeplug_one:SPEC"}, {"fakeplug_one": src})
    fake_dists("fake-two", "1.0", {"fakeplug_dup": "fakeplug_two:SPEC"}, {"fakeplug_two": src})
    reg = Registry()
    with pytest.raises(PluginLoadError) as err:
        reg.resolve("fakeplug_dup")
    with pytest.raises(PluginLoadError, match="more than one distribution"):
        reg.resolve("fp_dup")  # its alias: not silently the first distribution's
    msg = str(err.value)
    assert "fake-one 1.0" in msg and "fake-two 1.0" in msg and "uninstall" in msg
    row = next(r for r in reg.list() if r.name == "fakeplug_dup")
    assert row.error


def test_broken_plugin_is_reported_without_breaking_the_others(fake_dists, caplog):
    fake_dists(
        "fake-broken",
        "0.1",
        {"fakeplug_broken": "fakeplug_broken:SPEC"},
        {"fakeplug_broken": "raise ImportError('no module named upstream_thing')\n"},
    )
    fake_dists(
        "fake-good",
        "0.1",
        {"fakeplug_good": "fakeplug_good:SPEC"},
        {"fakeplug_good": plugin_source(("SPEC", "fakeplug_good", ""))},
    )
    reg = Registry()
    rows = {r.name: r for r in reg.list()}
    assert "upstream_thing" in rows["fakeplug_broken"].error
    assert rows["fakeplug_good"].error is None
    assert reg.resolve("fakeplug_good").spec.name == "fakeplug_good"
    assert reg.resolve("sgd").spec.name == "sgd"
    with pytest.raises(
        PluginLoadError, match=r"fake-broken 0.1.*upstream_thing.*Reinstall or upgrade fake-broken"
    ):
        reg.resolve("fakeplug_broken")


def test_entry_point_must_point_to_a_spec_of_the_same_name(fake_dists):
    fake_dists(
        "fake-mismatch",
        "0.1",
        {"fakeplug_x": "fakeplug_mm:SPEC"},
        {"fakeplug_mm": plugin_source(("SPEC", "fakeplug_y", ""))},
    )
    with pytest.raises(PluginLoadError, match="names must match"):
        Registry().resolve("fakeplug_x")


def test_autoload_switch_keeps_only_the_core(fake_dists, monkeypatch):
    fake_dists(
        "fake-plugin",
        "1.0",
        {"fakeplug_auto": "fakeplug_auto:SPEC"},
        {"fakeplug_auto": plugin_source(("SPEC", "fakeplug_auto", ""))},
    )
    assert Registry().resolve("fakeplug_auto")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    reg = Registry()
    assert BUILTINS <= set(reg.names())
    assert "fakeplug_auto" not in reg.names()
    with pytest.raises(UnknownOptimizerError):
        reg.resolve("fakeplug_auto")


def test_in_process_registration():
    reg = Registry()
    spec = OptimizerSpec(name="notebook_sgd", factory=_sgd_factory, summary="s", aliases=("nb_sgd",))
    reg.register(spec)
    assert reg.resolve("nb_sgd").provenance.distribution == "<in-process>"
    with pytest.raises(PluginLoadError, match="already registered.*replace=True"):
        reg.register(spec)
    reg.register(spec, replace=True)
    with pytest.raises(PluginLoadError, match="already registered"):
        reg.register(OptimizerSpec(name="sgd", factory=_sgd_factory, summary="s"))


def test_unknown_name_lists_close_and_installed_names():
    with pytest.raises(UnknownOptimizerError) as err:
        get_optimizer("adamw_trch")
    msg = str(err.value)
    assert "'adamw_trch'" in msg and "Did you mean: 'adamw_torch'" in msg
    assert "Installed:" in msg and "sgd" in msg and "optitrainer list" in msg
    assert isinstance(err.value, LookupError)


def test_known_but_uninstalled_plugin_names_its_pip_package(monkeypatch):
    monkeypatch.setitem(registry_mod.KNOWN_PLUGINS, "fancy_adam", "optitrainer-fancy")
    with pytest.raises(UnknownOptimizerError, match=r"pip install optitrainer-fancy"):
        Registry().resolve("fancy_adam")
    with pytest.raises(UnknownOptimizerError, match=r"pip install optitrainer-fancy"):
        Registry().resolve("fancy_adam_layerwise")


def test_missing_upstream_package_gives_the_exact_pip_command():
    reg = Registry()
    reg.register(
        OptimizerSpec(
            name="needs_pkg",
            factory=_sgd_factory,
            summary="s",
            requires=("not-a-real-pkg>=1.2",),
            imports=("not_a_real_pkg",),
        )
    )
    with pytest.raises(OptimizerNotInstalledError) as err:
        reg.resolve("needs_pkg")
    assert "pip install 'not-a-real-pkg>=1.2'" in str(err.value)
    assert isinstance(err.value, ImportError)
    row = next(r for r in reg.list() if r.name == "needs_pkg")
    assert row.installed is False


def test_transformers_only_names_fall_back_to_transformers():
    r = get_optimizer("adamw_anyprecision")
    assert r.provenance.distribution == "transformers"
    assert r.is_transformers_fallback and not get_optimizer("sgd").is_transformers_fallback


def test_spec_validation():
    with pytest.raises(ValueError, match="lower_snake_case"):
        OptimizerSpec(name="Bad-Name", factory=_sgd_factory, summary="s")
    with pytest.raises(ValueError, match="owns_backward"):
        OptimizerSpec(
            name="x", factory=_sgd_factory, summary="s", capabilities=Capabilities(owns_backward=True)
        )


def test_one_entry_point_may_provide_many_names(fake_dists):
    src = plugin_source(("A", "fakeplug_many_a", ""), ("B", "fakeplug_many_b", "aliases=('fpm_b',)"))
    fake_dists(
        "fake-many", "3.0", {"fake-many": "fakeplug_many:SPECS"}, {"fakeplug_many": src + "SPECS = (A, B)\n"}
    )
    reg = Registry()
    assert {"fakeplug_many_a", "fakeplug_many_b"} <= set(reg.names())
    assert "fake-many" not in reg.names()  # the entry point's own name is not an optimizer
    r = reg.resolve("fpm_b")
    assert r.spec.name == "fakeplug_many_b" and str(r.provenance) == "fake-many 3.0"
    rows = {row.name: row for row in reg.list()}
    assert rows["fakeplug_many_a"].error is None and rows["fakeplug_many_a"].provenance.version == "3.0"


def test_a_name_in_a_list_entry_point_clashing_with_another_distribution_is_reported(fake_dists):
    fake_dists(
        "fake-one",
        "1.0",
        {"fake-one": "fakeplug_l1:SPECS"},
        {"fakeplug_l1": plugin_source(("A", "fakeplug_twice", "")) + "SPECS = [A]\n"},
    )
    fake_dists(
        "fake-two",
        "2.0",
        {"fakeplug_twice": "fakeplug_l2:A"},
        {"fakeplug_l2": plugin_source(("A", "fakeplug_twice", ""))},
    )
    reg = Registry()
    with pytest.raises(PluginLoadError, match=r"fake-one 1.0.*fake-two 2.0.*uninstall"):
        reg.resolve("fakeplug_twice")
    assert any("fakeplug_twice" in p for p in reg.problems())


def test_alias_clashes_are_reported_naming_both_distributions(fake_dists, caplog):
    fake_dists(
        "fake-alpha",
        "1.0",
        {"fakeplug_alpha": "fakeplug_alpha:SPEC"},
        {"fakeplug_alpha": plugin_source(("SPEC", "fakeplug_alpha", "aliases=('shared_alias', 'sgd')"))},
    )
    fake_dists(
        "fake-beta",
        "1.0",
        {"fakeplug_beta": "fakeplug_beta:SPEC"},
        {"fakeplug_beta": plugin_source(("SPEC", "fakeplug_beta", "aliases=('shared_alias',)"))},
    )
    reg = Registry()
    with pytest.raises(PluginLoadError) as err:
        reg.resolve("shared_alias")
    assert "'fakeplug_alpha' (fake-alpha 1.0)" in str(err.value) and "'fakeplug_beta' (fake-beta 1.0)" in str(
        err.value
    )
    # an alias equal to another optimizer's name loses to the name, and says so
    assert reg.resolve("sgd").spec.name == "sgd"
    problems = reg.problems()
    assert any(
        "alias 'sgd' of 'fakeplug_alpha' (fake-alpha 1.0)" in p and "optitrainer" in p for p in problems
    )
    assert any("shared_alias" in p for p in problems)


def test_entry_point_holding_something_else_fails_to_load_naming_it(fake_dists):
    fake_dists(
        "fake-wrong",
        "0.1",
        {"fake-wrong": "fakeplug_wrong:SPECS"},
        {"fakeplug_wrong": "SPECS = ['not a spec']\n"},
    )
    reg = Registry()
    with pytest.raises(PluginLoadError, match="holds a str, not an OptimizerSpec"):
        reg.resolve("fake-wrong")


def test_importing_the_plugin_api_and_listing_import_neither_torch_nor_transformers():
    code = (
        "import sys; import optitrainer.plugin; from optitrainer.plugin import OptimizerSpec; "
        "import optitrainer; rows = optitrainer.list_optimizers(); "
        "heavy = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]; "
        "assert not heavy, heavy; print(len(rows))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= len(BUILTINS)


def test_optitrainer_list_reports_alias_clashes(fake_dists, capsys):
    from optitrainer import cli

    fake_dists(
        "fake-gamma",
        "1.0",
        {"fakeplug_gamma": "fakeplug_gamma:SPEC"},
        {"fakeplug_gamma": plugin_source(("SPEC", "fakeplug_gamma", "aliases=('adamw_torch',)"))},
    )
    registry_mod.REGISTRY.refresh()
    try:
        assert cli.main(["list"]) == 0
    finally:
        registry_mod.REGISTRY.refresh()
    out = " ".join(capsys.readouterr().out.split())
    assert "warning:" in out and "alias 'adamw_torch' of 'fakeplug_gamma' (fake-gamma 1.0)" in out


def test_install_hint_names_the_family_of_a_prefixed_name_only_when_it_is_missing(monkeypatch):
    reg = Registry()
    with pytest.raises(UnknownOptimizerError) as err:
        reg.resolve("po_not_a_real_optimizer")
    installed = any(r.provenance.distribution == "optitrainer-pytorch-optimizer" for r in reg.list())
    assert ("pip install optitrainer-pytorch-optimizer" in str(err.value)) is not installed
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")  # only the core: the bridge counts as not installed
    with pytest.raises(UnknownOptimizerError, match="pip install optitrainer-pytorch-optimizer"):
        Registry().resolve("po_adabelief")


def test_a_stub_module_without_spec_counts_as_installed_and_never_crashes(monkeypatch):
    """transformers' own optimizer tests stub bitsandbytes in sys.modules (no __spec__): find_spec raised
    ``ValueError: bitsandbytes.__spec__ is not set`` from every installed-ness check."""
    import sys
    import types

    from optitrainer import OptiTrainingArguments
    from optitrainer.registry import importable

    monkeypatch.setitem(
        sys.modules, "optitrainer_stubbed_upstream", types.ModuleType("optitrainer_stubbed_upstream")
    )
    sys.modules["optitrainer_stubbed_upstream"].__spec__ = None
    assert importable("optitrainer_stubbed_upstream.sub")
    assert not importable("optitrainer_no_such_module")
    stub = types.ModuleType("bitsandbytes")
    stub.__spec__ = None
    monkeypatch.setitem(sys.modules, "bitsandbytes", stub)
    args = OptiTrainingArguments(
        "unused", optim="adamw_bnb_8bit", report_to="none"
    )  # resolving checks installed-ness
    assert args.optim == "adamw_bnb_8bit"
