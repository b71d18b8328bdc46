"""Find optimizer plugins through the ``optitrainer.optimizers`` entry-point group.

The first lookup or listing imports every plugin's spec module (cheap: by contract they import
neither torch nor their upstream package) to index names and aliases, so that a name or alias claimed
twice is found whichever is asked for; the upstream optimizer package is imported only when the
optimizer is built.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import threading
from dataclasses import dataclass, field

from .errors import OptimizerNotInstalledError, PluginLoadError, UnknownOptimizerError
from .plugin import ENGINE_MODES, OptimizerSpec

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
    **dict.fromkeys(
        ["stable_adamw", "optimi_stable_adamw", "optimi_adamw", "optimi_adan", "optimi_lion", "optimi_radam"]
        + ["optimi_ranger", "lion", "adan", "ranger"],
        "optitrainer-optimi",
    ),
    "grokadamw": "optitrainer-grokadamw",
    **dict.fromkeys(
        ["adamw_bnb_8bit", "adamw_8bit", "ademamix", "ademamix_8bit", "lion_32bit", "lion_8bit"]
        + ["paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit"]
        + ["paged_lion_32bit", "paged_lion_8bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit"],
        "optitrainer-bitsandbytes",
    ),
    "adam_mini": "optitrainer-adam-mini",
    "badam": "optitrainer-badam",
    **dict.fromkeys(["prodigy", "prodigyopt"], "optitrainer-prodigy"),
}
#: Name prefixes of plugin families: every ``po_<name>`` comes from the pytorch-optimizer bridge.
KNOWN_PREFIXES: dict[str, str] = {"po_": "optitrainer-pytorch-optimizer"}


def known_distribution(name: str) -> str | None:
    """The plugin distribution of this project that provides ``name``, if one does."""
    if name in KNOWN_PLUGINS:
        return KNOWN_PLUGINS[name]
    return next((dist for prefix, dist in KNOWN_PREFIXES.items() if name.startswith(prefix)), None)


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
    """One entry point: a spec, or a sequence of specs (one entry point, many names)."""

    name: str
    provenance: Provenance
    entry_point: importlib.metadata.EntryPoint | None = None
    specs: list[OptimizerSpec] | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        return self.entry_point.value if self.entry_point else "?"

    def load(self) -> list[OptimizerSpec]:
        """The specs this entry point provides; ``[]`` when it failed to load (see :attr:`error`)."""
        if self.specs is None and self.error is None:
            try:
                self.specs = self._load()
            except Exception as exc:  # a broken plugin must not break the others
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "optitrainer plugin %r from %s failed to load: %s", self.name, self.provenance, exc
                )
        return self.specs or []

    def _load(self) -> list[OptimizerSpec]:
        obj = self.entry_point.load()
        if callable(obj) and not isinstance(obj, OptimizerSpec):
            obj = obj()
        many = isinstance(obj, (list, tuple))
        specs = list(obj) if many else [obj]
        for spec in specs:
            if not isinstance(spec, OptimizerSpec):
                raise TypeError(f"{self.where} holds a {type(spec).__name__}, not an OptimizerSpec")
            if spec.name.endswith(LAYERWISE_SUFFIX):
                raise ValueError(
                    f"{spec.name!r}: '_layerwise' is a mode, not a name; declare Capabilities(layerwise=True)"
                )
        if not many and specs[0].name != self.name:
            raise ValueError(
                f"entry point {self.name!r} points to a spec named {specs[0].name!r}; the names must match "
                "(or point the entry point to a list of specs)"
            )
        return specs

    def failure(self) -> PluginLoadError:
        return PluginLoadError(
            f"the plugin providing {self.name!r} ({self.provenance}, entry point {self.where}) failed to "
            f"load: {self.error}. Reinstall or upgrade {self.provenance.distribution}."
        )


@dataclass
class _Index:
    """Every name and alias of the installed plugins, with what went wrong while reading them."""

    specs: dict[str, tuple[OptimizerSpec, Provenance]] = field(default_factory=dict)
    #: names registered by more than one distribution
    rivals: dict[str, list[Provenance]] = field(default_factory=dict)
    #: entry points that failed to load, by entry-point name
    broken: dict[str, _Entry] = field(default_factory=dict)
    #: alias -> the canonical names (with distribution) that claim it
    aliases: dict[str, list[tuple[str, Provenance]]] = field(default_factory=dict)

    def add(self, spec: OptimizerSpec, prov: Provenance) -> None:
        held = self.specs.get(spec.name)
        if held is None:
            self.specs[spec.name] = (spec, prov)
        elif held[0] is not spec:
            self.rivals.setdefault(spec.name, [held[1]]).append(prov)
        for alias in spec.aliases:
            claims = self.aliases.setdefault(alias, [])
            if (spec.name, prov) not in claims:
                claims.append((spec.name, prov))

    def alias_problems(self) -> dict[str, str]:
        """Aliases that name another optimizer or are claimed twice, each with a sentence saying so."""
        out = {}
        for alias, claims in self.aliases.items():
            owners = [f"{name!r} ({prov})" for name, prov in claims]
            if alias in self.specs:
                out[alias] = (
                    f"the alias {alias!r} of {', '.join(owners)} is also the name of the optimizer from "
                    f"{self.specs[alias][1]}; optim={alias!r} means that optimizer. Rename the alias."
                )
            elif len({name for name, _ in claims}) > 1:
                out[alias] = (
                    f"the alias {alias!r} is claimed by {' and '.join(owners)}; use a canonical name, "
                    "or uninstall one of the distributions."
                )
        return out


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
    recommended_lr: float | None = None
    #: "standard", and "layerwise" when ``<name>_layerwise`` runs
    modes: tuple[str, ...] = ("standard",)
    #: the distributed engines (:data:`~optitrainer.plugin.ENGINE_MODES`) it claims
    engines: tuple[str, ...] = ()


class Registry:
    """Optimizer names → plugin specs. One process-wide instance lives in :data:`REGISTRY`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: list[_Entry] | None = None
        self._index_cache: _Index | None = None
        self._in_process: dict[str, OptimizerSpec] = {}

    # discovery -------------------------------------------------------------------------------
    def _discover(self) -> list[_Entry]:
        with self._lock:
            if self._entries is not None:
                return self._entries
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
            entries: list[_Entry] = []
            seen: set[tuple[str, str]] = set()
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else "<unknown>"
                if not autoload and _normalize(dist_name) != CORE_DISTRIBUTION:
                    continue
                key = (_normalize(dist_name), ep.name)
                if key in seen:  # the same distribution seen twice on sys.path
                    continue
                seen.add(key)
                entries.append(_Entry(ep.name, Provenance(dist_name, dist.version if dist else None), ep))
            self._entries = entries
            return entries

    def _index(self) -> _Index:
        """Load every spec module (cheap: they import no upstream package) and index names and aliases."""
        with self._lock:
            if self._index_cache is None:
                index = _Index()
                for entry in self._discover():
                    specs = entry.load()
                    if entry.error is not None:
                        index.broken[entry.name] = entry
                    for spec in specs:
                        index.add(spec, entry.provenance)
                for problem in index.alias_problems().values():
                    logger.warning("optitrainer: %s", problem)
                self._index_cache = index
            return self._index_cache

    def refresh(self) -> None:
        """Forget discovered plugins (e.g. after ``pip install`` in the same process)."""
        with self._lock:
            self._entries = None
            self._index_cache = None
            importlib.invalidate_caches()

    def problems(self) -> list[str]:
        """What is wrong with the installed plugins: failed loads, names and aliases claimed twice."""
        index = self._index()
        out = [entry.failure().args[0] for entry in index.broken.values()]
        out += [_rivals_message(name, provs) for name, provs in index.rivals.items()]
        out += list(index.alias_problems().values())
        return out

    # in-process registration ---------------------------------------------------------------------
    def register(self, spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
        """Register ``spec`` for this process (notebooks, tests). Returns it, so it works as a decorator target."""
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"register() takes an OptimizerSpec, got {type(spec).__name__}")
        with self._lock:
            if not replace and (spec.name in self._in_process or spec.name in self._index().specs):
                raise PluginLoadError(
                    f"optimizer {spec.name!r} is already registered; pass replace=True to override it"
                )
            self._in_process[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        with self._lock:
            self._in_process.pop(name, None)

    # lookup --------------------------------------------------------------------------------------
    def _load_all(self) -> dict[str, tuple[OptimizerSpec | None, Provenance, str | None]]:
        """name -> (spec or None when it cannot be used, provenance, error)."""
        index = self._index()
        out: dict[str, tuple[OptimizerSpec | None, Provenance, str | None]] = {}
        for name, entry in index.broken.items():
            out[name] = (None, entry.provenance, entry.error)
        for name, (spec, prov) in index.specs.items():
            if name in index.rivals:
                out[name] = (None, prov, _rivals_message(name, index.rivals[name]))
            else:
                out[name] = (spec, prov, None)
        for name, spec in self._in_process.items():
            out[name] = (spec, Provenance("<in-process>"), None)
        return out

    def _find(self, name: str) -> tuple[OptimizerSpec, Provenance] | None:
        if name in self._in_process:
            return self._in_process[name], Provenance("<in-process>")
        index = self._index()
        if name in index.rivals:
            raise PluginLoadError(_rivals_message(name, index.rivals[name]))
        if name in index.specs:
            return index.specs[name]
        if name in index.broken:
            raise index.broken[name].failure()
        for spec in self._in_process.values():
            if name in spec.aliases:
                return spec, Provenance("<in-process>")
        claims = index.aliases.get(name)
        if claims:
            if len({n for n, _ in claims}) > 1:
                raise PluginLoadError(index.alias_problems()[name])
            return self._find(claims[0][0])  # the canonical name's own checks (claimed twice?) apply
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
            n for n, (s, _, _) in self._load_all().items() if s is not None and s.capabilities.layerwise
        )

    def names(self) -> list[str]:
        """Every registered canonical name (plugins that fail to load included)."""
        with self._lock:
            return sorted(self._load_all())

    def _unknown_message(self, name: str) -> str:
        loaded = self._load_all()
        candidates = set(loaded)
        for spec, _, _ in loaded.values():
            if spec is not None:
                candidates.update(spec.aliases)
        candidates.update(KNOWN_PLUGINS)
        base = name[: -len(LAYERWISE_SUFFIX)] if name.endswith(LAYERWISE_SUFFIX) else name
        close = difflib.get_close_matches(name, sorted(candidates), n=3, cutoff=0.6)
        lines = [f"unknown optimizer optim={name!r}."]
        dist = known_distribution(base)
        installed = {_normalize(prov.distribution) for _, prov, _ in loaded.values()}
        if (
            dist is not None
            and base not in candidates - set(KNOWN_PLUGINS)
            and _normalize(dist) not in installed
        ):
            lines.append(
                f"It is provided by the plugin distribution {dist!r}, which is not installed: pip install {dist}"
            )
        if close:
            lines.append("Did you mean: " + ", ".join(repr(c) for c in close) + "?")
        lines.append(
            "Installed: " + ", ".join(sorted(n for n, (s, _, _) in loaded.items() if s is not None)) + "."
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
            for name, (spec, prov, error) in sorted(self._load_all().items()):
                if spec is None:
                    rows.append(OptimizerInfo(name, (), "", (), prov, (), False, error=error or "conflict"))
                    continue
                caps = spec.capabilities
                rows.append(
                    OptimizerInfo(
                        name,
                        spec.aliases,
                        spec.summary,
                        tuple(caps.flags()),
                        prov,
                        spec.requires,
                        is_installed(spec),
                        recommended_lr=spec.recommended_lr,
                        modes=("standard", "layerwise") if caps.layerwise else ("standard",),
                        engines=tuple(m for m in ENGINE_MODES if m in caps.engines),
                    )
                )
        return rows


def _rivals_message(name: str, provenances: list[Provenance]) -> str:
    who = ", ".join(str(p) for p in provenances)
    return (
        f"optimizer {name!r} is registered by more than one distribution ({who}); "
        "uninstall all but one of them (pip uninstall ...)"
    )


def _normalize(dist: str) -> str:
    return dist.lower().replace("_", "-")


def importable(module: str) -> bool:
    """Whether the top-level package of ``module`` can be imported (checked without importing it).

    A module already in ``sys.modules`` counts, also one without ``__spec__`` (a stub a test or a
    framework put there), for which ``find_spec`` raises ``ValueError`` instead of answering.
    """
    top = module.split(".")[0]
    if sys.modules.get(top) is not None:
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def is_installed(spec: OptimizerSpec) -> bool:
    """Whether every upstream module the spec needs is importable (checked without importing it)."""
    return all(importable(m) for m in spec.imports)


def ensure_installed(spec: OptimizerSpec, provenance: Provenance | None = None) -> None:
    missing = [m for m in spec.imports if not importable(m)]
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
