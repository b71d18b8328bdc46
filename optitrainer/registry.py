"""Find optimizer plugins through the ``optitrainer.optimizers`` entry-point group.

Discovery reads entry-point metadata only; a plugin's spec module is imported when its name is
looked up or listed, and the upstream optimizer package only when the optimizer is built.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field

from .errors import OptimizerNotInstalledError, PluginLoadError, UnknownOptimizerError
from .plugin import OptimizerSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "optitrainer.optimizers"
#: Set to 1 to ignore every plugin distribution except the core's own built-ins.
DISABLE_AUTOLOAD_ENV = "OPTITRAINER_DISABLE_PLUGIN_AUTOLOAD"
LAYERWISE_SUFFIX = "_layerwise"
CORE_DISTRIBUTION = "optitrainer"

#: Names provided by the plugins of this project, for install hints when they are absent.
KNOWN_PLUGINS: dict[str, str] = {
    **dict.fromkeys(["galore_adamw", "galore_adamw_8bit", "galore_adafactor"], "optitrainer-galore"),
    **dict.fromkeys(["apollo_adamw", "apollo_mini"], "optitrainer-apollo"),
    **dict.fromkeys(["lomo", "adalomo"], "optitrainer-lomo"),
    **dict.fromkeys(
        ["schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd", "schedule_free_radamw"],
        "optitrainer-schedulefree",
    ),
    **dict.fromkeys(["stable_adamw", "lion", "adan", "ranger"], "optitrainer-optimi"),
    "grokadamw": "optitrainer-grokadamw",
}


@dataclass(frozen=True)
class Provenance:
    """Where a name comes from: the distribution (and version) that registered it."""

    distribution: str
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}" if self.version else self.distribution


@dataclass(frozen=True)
class ResolvedOptimizer:
    """The result of looking up an ``optim=`` value."""

    requested: str
    spec: OptimizerSpec
    layerwise: bool
    provenance: Provenance

    @property
    def name(self) -> str:
        """Canonical name, with ``_layerwise`` when running layerwise."""
        return self.spec.name + (LAYERWISE_SUFFIX if self.layerwise else "")

    @property
    def is_transformers_fallback(self) -> bool:
        """No plugin provides the name: transformers' own handler builds it (and parses its optim_args)."""
        return self.provenance.distribution == "transformers"


@dataclass
class _Entry:
    name: str
    provenance: Provenance
    entry_point: importlib.metadata.EntryPoint | None = None
    spec: OptimizerSpec | None = None
    error: str | None = None
    rivals: list[Provenance] = field(default_factory=list)

    def load(self) -> OptimizerSpec:
        if self.rivals:
            who = ", ".join(str(p) for p in [self.provenance, *self.rivals])
            raise PluginLoadError(
                f"optimizer {self.name!r} is registered by more than one distribution ({who}); "
                f"uninstall all but one of them (pip uninstall ...)"
            )
        if self.spec is None and self.error is None:
            try:
                obj = self.entry_point.load()
                spec = obj() if callable(obj) and not isinstance(obj, OptimizerSpec) else obj
                if not isinstance(spec, OptimizerSpec):
                    raise TypeError(
                        f"{self.entry_point.value} is a {type(spec).__name__}, not an OptimizerSpec"
                    )
                if spec.name.endswith(LAYERWISE_SUFFIX):
                    raise ValueError(
                        f"{spec.name!r}: '_layerwise' is a mode, not a name; declare Capabilities(layerwise=True)"
                    )
                if spec.name != self.name:
                    raise ValueError(
                        f"entry point {self.name!r} points to a spec named {spec.name!r}; the names must match"
                    )
                self.spec = spec
            except Exception as exc:  # a broken plugin must not break the others
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "optitrainer plugin %r from %s failed to load: %s", self.name, self.provenance, exc
                )
        if self.error is not None:
            raise PluginLoadError(
                f"the plugin providing {self.name!r} ({self.provenance}, entry point "
                f"{self.entry_point.value if self.entry_point else '?'}) failed to load: {self.error}. "
                f"Reinstall or upgrade {self.provenance.distribution}."
            )
        return self.spec


@dataclass(frozen=True)
class OptimizerInfo:
    """One row of :func:`list_optimizers`."""

    name: str
    aliases: tuple[str, ...]
    summary: str
    capabilities: tuple[str, ...]
    provenance: Provenance
    requires: tuple[str, ...]
    installed: bool
    error: str | None = None


class Registry:
    """Optimizer names → plugin specs. One process-wide instance lives in :data:`REGISTRY`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] | None = None
        self._in_process: dict[str, OptimizerSpec] = {}

    # discovery -------------------------------------------------------------------------------
    def _discover(self) -> dict[str, _Entry]:
        with self._lock:
            if self._entries is not None:
                return self._entries
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
            entries: dict[str, _Entry] = {}
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else "<unknown>"
                if not autoload and _normalize(dist_name) != CORE_DISTRIBUTION:
                    continue
                prov = Provenance(dist_name, dist.version if dist is not None else None)
                existing = entries.get(ep.name)
                if existing is None:
                    entries[ep.name] = _Entry(ep.name, prov, ep)
                elif _normalize(existing.provenance.distribution) != _normalize(dist_name):
                    existing.rivals.append(prov)
            self._entries = entries
            return entries

    def refresh(self) -> None:
        """Forget discovered plugins (e.g. after ``pip install`` in the same process)."""
        with self._lock:
            self._entries = None
            importlib.invalidate_caches()

    # in-process registration ---------------------------------------------------------------------
    def register(self, spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
        """Register ``spec`` for this process (notebooks, tests). Returns it, so it works as a decorator target."""
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"register() takes an OptimizerSpec, got {type(spec).__name__}")
        with self._lock:
            if not replace and (spec.name in self._in_process or spec.name in self._discover()):
                raise PluginLoadError(
                    f"optimizer {spec.name!r} is already registered; pass replace=True to override it"
                )
            self._in_process[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        with self._lock:
            self._in_process.pop(name, None)

    # lookup --------------------------------------------------------------------------------------
    def _load_all(self) -> dict[str, tuple[OptimizerSpec | None, _Entry | None]]:
        out: dict[str, tuple[OptimizerSpec | None, _Entry | None]] = {}
        for name, entry in self._discover().items():
            try:
                out[name] = (entry.load(), entry)
            except PluginLoadError:
                out[name] = (None, entry)
        for name, spec in self._in_process.items():
            out[name] = (spec, None)
        return out

    def _find(self, name: str) -> tuple[OptimizerSpec, Provenance] | None:
        if name in self._in_process:
            return self._in_process[name], Provenance("<in-process>")
        entries = self._discover()
        if name in entries:
            return entries[name].load(), entries[name].provenance
        # aliases need the specs: load them all (cheap: spec modules import no upstream package)
        for spec, entry in self._load_all().values():
            if spec is not None and name in spec.aliases:
                return spec, entry.provenance if entry else Provenance("<in-process>")
        return None

    def resolve(self, requested: str, *, check_installed: bool = True) -> ResolvedOptimizer:
        """Look up an ``optim=`` value (name, alias, or ``<name>_layerwise``).

        Names that only ``transformers`` knows resolve to a spec that defers to transformers' own handler.
        """
        name = str(getattr(requested, "value", requested)).strip()
        with self._lock:
            found = self._find(name)
            layerwise = False
            if found is None and name.endswith(LAYERWISE_SUFFIX):
                found = self._find(name[: -len(LAYERWISE_SUFFIX)])
                layerwise = found is not None
            if found is None:
                from .transformers_fallback import fallback_spec

                fb = fallback_spec(name)
                if fb is not None:
                    found = fb
            if found is None:
                raise UnknownOptimizerError(self._unknown_message(name))
        spec, prov = found
        if layerwise and not spec.capabilities.layerwise:
            raise UnknownOptimizerError(
                f"optim={name!r}: {spec.name!r} ({prov}) cannot run layerwise (one optimizer per parameter). "
                f"Use optim={spec.name!r}, or pick a layerwise-capable optimizer: "
                + ", ".join(n + LAYERWISE_SUFFIX for n in self.layerwise_names())
            )
        if check_installed:
            ensure_installed(spec, prov)
        return ResolvedOptimizer(name, spec, layerwise, prov)

    def layerwise_names(self) -> list[str]:
        return sorted(
            n for n, (s, _) in self._load_all().items() if s is not None and s.capabilities.layerwise
        )

    def names(self) -> list[str]:
        """Every registered canonical name (plugins that fail to load included)."""
        with self._lock:
            return sorted(set(self._discover()) | set(self._in_process))

    def _unknown_message(self, name: str) -> str:
        loaded = self._load_all()
        candidates = set(loaded)
        for spec, _ in loaded.values():
            if spec is not None:
                candidates.update(spec.aliases)
        candidates.update(KNOWN_PLUGINS)
        base = name[: -len(LAYERWISE_SUFFIX)] if name.endswith(LAYERWISE_SUFFIX) else name
        close = difflib.get_close_matches(name, sorted(candidates), n=3, cutoff=0.6)
        lines = [f"unknown optimizer optim={name!r}."]
        if base in KNOWN_PLUGINS and base not in candidates - set(KNOWN_PLUGINS):
            dist = KNOWN_PLUGINS[base]
            lines.append(
                f"It is provided by the plugin distribution {dist!r}, which is not installed: pip install {dist}"
            )
        if close:
            lines.append("Did you mean: " + ", ".join(repr(c) for c in close) + "?")
        lines.append(
            "Installed: " + ", ".join(sorted(n for n, (s, _) in loaded.items() if s is not None)) + "."
        )
        lines.append(
            "Run `optitrainer list` to see every optimizer; a new one is added by installing a plugin that "
            f"registers it in the {ENTRY_POINT_GROUP!r} entry-point group."
        )
        return " ".join(lines)

    # listing ----------------------------------------------------------------------------------
    def list(self) -> list[OptimizerInfo]:
        """Every registered optimizer, without importing any upstream optimizer package."""
        rows = []
        with self._lock:
            for name, (spec, entry) in sorted(self._load_all().items()):
                prov = entry.provenance if entry else Provenance("<in-process>")
                if spec is None:
                    rows.append(
                        OptimizerInfo(name, (), "", (), prov, (), False, error=entry.error or "conflict")
                    )
                    continue
                flags = tuple(spec.capabilities.flags())
                rows.append(
                    OptimizerInfo(
                        name, spec.aliases, spec.summary, flags, prov, spec.requires, is_installed(spec)
                    )
                )
        return rows


def _normalize(dist: str) -> str:
    return dist.lower().replace("_", "-")


def is_installed(spec: OptimizerSpec) -> bool:
    """Whether every upstream module the spec needs is importable (checked without importing it)."""
    return all(importlib.util.find_spec(m.split(".")[0]) is not None for m in spec.imports)


def ensure_installed(spec: OptimizerSpec, provenance: Provenance | None = None) -> None:
    missing = [m for m in spec.imports if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise OptimizerNotInstalledError(
            f"optimizer {spec.name!r}"
            + (f" (plugin {provenance})" if provenance else "")
            + f" needs the package(s) {', '.join(missing)}, which are not installed. Install with: "
            + spec.pip_command()
        )


#: The process-wide registry.
REGISTRY = Registry()


def register(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Register an optimizer spec in this process. See :meth:`Registry.register`."""
    return REGISTRY.register(spec, replace=replace)


def get_optimizer(name: str) -> ResolvedOptimizer:
    """Resolve an ``optim=`` value to its spec, mode and providing distribution."""
    return REGISTRY.resolve(name)


def list_optimizers() -> list[OptimizerInfo]:
    """Every registered optimizer (name, aliases, capabilities, provenance, installed or not)."""
    return REGISTRY.list()
