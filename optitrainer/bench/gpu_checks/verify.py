"""What a training row must show: the loss fell, the states are what the name promises, peak >= floor."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import EIGHT_BIT, PAGED, Contender
from .train import Measured


@dataclass(frozen=True)
class Finding:
    """One verified property of a row, and how it came out."""

    ok: bool
    text: str


def loss_fell(m: Measured) -> Finding:
    """Every logged loss is finite and the last is below the first (the same batch at every step)."""
    if not m.losses:
        return Finding(False, "no loss was logged")
    if not m.finite:
        return Finding(False, f"loss not finite: {m.losses}")
    first, last = m.losses[0], m.losses[-1]
    fell = last < first
    return Finding(fell, f"loss {first:.4f} -> {last:.4f}" + ("" if fell else ": did not fall"))


def eight_bit_states(m: Measured) -> Finding:
    n = m.state.uint8_tensors
    if n:
        return Finding(True, f"8-bit states ({n} uint8 tensors)")
    return Finding(False, "no uint8 tensor in the optimizer state: the states are not 8-bit")


def paged_states(m: Measured) -> Finding:
    n = m.state.paged_tensors
    if n:
        return Finding(True, f"paged ({n} state tensors in unified memory)")
    return Finding(False, "no paged tensor in the optimizer state")


def peak_covers_floor(m: Measured, paged: bool) -> Finding:
    """The measured peak holds at least what the floor counts (else the floor's accounting is wrong).

    Paged states live in CUDA unified memory, outside torch's allocator: their peak may sit below the floor.
    """
    if m.peak_bytes is None:
        return Finding(False, "no peak measured")
    if paged:
        return Finding(True, "paged states are outside the allocator's peak")
    if m.peak_bytes >= m.floor_bytes:
        return Finding(True, "peak >= floor")
    return Finding(False, f"peak {m.peak_bytes:,} B below the floor {m.floor_bytes:,} B")


def training_findings(m: Measured, contender: Contender) -> list[Finding]:
    findings = [loss_fell(m)]
    if EIGHT_BIT in contender.expects:
        findings.append(eight_bit_states(m))
    paged = PAGED in contender.expects
    if paged:
        findings.append(paged_states(m))
    findings.append(peak_covers_floor(m, paged and m.state.paged_tensors > 0))
    return findings


def summary(findings: list[Finding]) -> tuple[bool, str]:
    """All passed?, and one line naming each finding (failures first)."""
    failed = [f.text for f in findings if not f.ok]
    passed = [f.text for f in findings if f.ok]
    return not failed, "; ".join([f"FAILED: {t}" for t in failed] + passed)
