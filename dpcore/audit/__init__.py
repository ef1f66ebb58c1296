"""One-run privacy auditing: estimators, canaries in the pipeline, and reports.

* :mod:`dpcore.audit.estimators` — lower bounds on epsilon from canary scores
  (numpy/scipy only; usable on scores from anywhere).
* :class:`CanaryAudit` — Dirac canaries inserted into a private training run through
  the pipeline's protocols; :meth:`CanaryAudit.report` gives an :class:`AuditReport`.
* :func:`run_audit` — the short synthetic audit behind ``dpcore audit``.

Names are imported lazily so that the estimators do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "AuditReport": "dpcore.audit.report",
    "CanaryAudit": "dpcore.audit.canaries",
    "Canaries": "dpcore.audit.canaries",
    "run_audit": "dpcore.audit.run",
}

__all__ = sorted([*_LAZY, "estimators"])


def __getattr__(name: str) -> Any:
    if name == "estimators":
        return importlib.import_module("dpcore.audit.estimators")
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dpcore.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(target), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from . import estimators as estimators
    from .canaries import Canaries as Canaries
    from .canaries import CanaryAudit as CanaryAudit
    from .report import AuditReport as AuditReport
    from .run import run_audit as run_audit
