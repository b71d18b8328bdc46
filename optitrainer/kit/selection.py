"""Which names a run checks: everything asked for, or a bounded, deterministic sample of big catalogues.

``optitrainer check --all`` and the core's CI check every name of the core and of each distribution with
at most :data:`FULL_DISTRIBUTION_MAX` names; of a larger distribution (a bridge to a catalogue of 80
optimizers) a deterministic sample of :data:`SAMPLE_SIZE` names, picked by a hash of the name so that a
new name does not reshuffle the others. ``OPTITRAINER_CHECK_ALL=1`` checks everything.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict

CHECK_ALL_ENV = "OPTITRAINER_CHECK_ALL"
FULL_DISTRIBUTION_MAX = 8
SAMPLE_SIZE = 3  # of a large distribution; the whole suite must stay within CI's ~20 minutes
#: distributed runs of a sampled check: one name per distribution, under DDP (the core's ZeRO and FSDP2
#: support has its own tests; a sampled DeepSpeed run would add DeepSpeed's start-up to every rank)
DISTRIBUTED_SAMPLE_ENGINES = ("ddp",)
#: at most this many names train distributed in a sampled run (tests/test_distributed.py covers every
#: seed plugin under DDP; the sample keeps every plugin's claim honest over time)
DISTRIBUTED_SAMPLE_MAX = 4


def check_all() -> bool:
    return os.environ.get(CHECK_ALL_ENV, "").strip().lower() in ("1", "true", "yes")


def _rank(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def distribution_names(dist: str) -> list[str]:
    """Every name registered by the distribution ``dist`` (case and ``-``/``_`` insensitive)."""
    from ..registry import REGISTRY

    key = dist.lower().replace("_", "-")
    names = [r.name for r in REGISTRY.list() if r.provenance.distribution.lower().replace("_", "-") == key]
    if not names:
        known = sorted({r.provenance.distribution for r in REGISTRY.list()})
        raise LookupError(
            f"no optimizer is registered by a distribution named {dist!r}; installed: {', '.join(known)}"
        )
    return names


def sample(names_by_dist: dict[str, list[str]]) -> tuple[list[str], dict[str, list[str]]]:
    """``(selected names, {distribution: names left out})`` under the sampling rule above."""
    selected, left_out = [], {}
    for dist, names in sorted(names_by_dist.items()):
        if dist == "optitrainer" or len(names) <= FULL_DISTRIBUTION_MAX:
            selected += names
            continue
        keep = sorted(names, key=_rank)[:SAMPLE_SIZE]
        selected += keep
        left_out[dist] = sorted(set(names) - set(keep))
    return sorted(selected), left_out


def default_names(sampled: bool | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """Every registered name, sampled unless ``OPTITRAINER_CHECK_ALL=1`` (or ``sampled=False``)."""
    from ..registry import REGISTRY

    by_dist: dict[str, list[str]] = defaultdict(list)
    for row in REGISTRY.list():
        by_dist[row.provenance.distribution].append(row.name)
    if sampled is None:
        sampled = not check_all()
    if not sampled:
        return sorted(n for names in by_dist.values() for n in names), {}
    return sample(by_dist)


def distributed_sample(cases) -> set[tuple[str, str]]:
    """The (form, engine) pairs a sampled run trains distributed: of the first standard name (by hash) of
    each distribution, :data:`DISTRIBUTED_SAMPLE_MAX` names under the engines of
    :data:`DISTRIBUTED_SAMPLE_ENGINES` they claim."""
    from ..compat import supported_engines
    from ..registry import REGISTRY

    first: dict[str, str] = {}
    for case in sorted(cases, key=lambda c: _rank(c.optim)):
        if case.skip or case.optim.endswith("_layerwise"):
            continue
        resolved = REGISTRY.resolve(case.optim, check_installed=False)
        first.setdefault(resolved.provenance.distribution, case.optim)
    pairs = set()
    # bounded whatever the number of distributions: each run costs two ranks' trainer start-up
    for optim in sorted(first.values(), key=_rank)[:DISTRIBUTED_SAMPLE_MAX]:
        engines = supported_engines(REGISTRY.resolve(optim, check_installed=False))
        pairs.update((optim, e) for e in DISTRIBUTED_SAMPLE_ENGINES if e in engines)
    return pairs
