"""What one check of the conformance kit found about one ``optim=`` form."""

from __future__ import annotations

from dataclasses import dataclass

PASSED = "passed"
FAILED = "failed"
#: the check does not apply (capability not claimed) or the upstream package is absent
SKIPPED = "skipped"
#: claimed, but this machine cannot exercise it (e.g. fp16 loss scaling without a GPU)
NOT_RUNNABLE = "not runnable here"


class Skip(Exception):
    """Raised by a check that does not apply to the case; the message says why."""


class NotRunnable(Exception):
    """Raised by a check whose claim this machine cannot exercise; the message says why."""


@dataclass(frozen=True)
class CheckResult:
    """One (form, check) outcome: ``status`` is one of the constants above, ``detail`` the why."""

    optim: str
    check: str
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def __str__(self) -> str:
        return f"{self.optim} {self.check}: {self.status}" + (f" ({self.detail})" if self.detail else "")


def outcome(optim: str, check: str, run) -> CheckResult:
    """Run ``run()`` (returns an optional detail) and turn what happens into a :class:`CheckResult`."""
    try:
        detail = run()
    except Skip as exc:
        return CheckResult(optim, check, SKIPPED, str(exc))
    except NotRunnable as exc:
        return CheckResult(optim, check, NOT_RUNNABLE, str(exc))
    except AssertionError as exc:
        return CheckResult(optim, check, FAILED, str(exc) or "assertion failed")
    except Exception as exc:  # noqa: BLE001 - a crash is a failure of the plugin, reported with its cause
        return CheckResult(optim, check, FAILED, f"{type(exc).__name__}: {exc}")
    return CheckResult(optim, check, PASSED, detail or "")
