"""The bench's report: one row per implementation and configuration, targets, tables."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from . import core
from .settings import Settings

STANDARD_COLUMNS = [
    "implementation",
    "median",
    "IQR",
    "n",
    "rel.err",
    "agree",
    "bilevel/impl",
    "target",
    "met",
    "note",
]


def _num(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def rtol_for(dtype: torch.dtype) -> float:
    """Agreement tolerance: rounding differences of reordered float32 kernels grow through
    hundreds of steps; float64 leaves no room for a real difference."""
    return 1e-4 if dtype == torch.float32 else 1e-9


@dataclass
class Report:
    settings: Settings
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)

    def add_rows(
        self,
        problem: str,
        config: dict[str, Any],
        results: dict[str, core.Result],
        subject: str,
        targets: dict[str, tuple[float, str]] | None = None,
        extra: dict[str, dict[str, Any]] | None = None,
        label: str | None = None,
    ) -> list[dict[str, Any]]:
        """One row per implementation; ``targets[name] = (max ratio, label)`` where the ratio
        is the subject's time over that implementation's; ``extra[name]`` adds fields."""
        subj = results.get(subject)
        subj_t = subj.median if subj is not None else None
        added = []
        for name, res in results.items():
            ratio = None
            if name != subject and subj_t is not None and res.median:
                ratio = subj_t / res.median
            target = (targets or {}).get(name)
            met = None
            if target is not None and ratio is not None:
                met = ratio <= target[0]
            row = {
                "problem": problem,
                **config,
                "implementation": name,
                "median_s": res.median,
                "spread": res.spread,
                "repeats": len(res.times),
                "times_s": res.times,
                "rel_error": _num(res.rel_error),
                "agree": res.agree,
                "failed": res.failed,
                "ratio": ratio,
                "target": target[1] if target else None,
                "target_max_ratio": target[0] if target else None,
                "met": met,
                "note": res.note,
                "reference": res.reference,
                "checked": res.checked,
                **((extra or {}).get(name, {})),
            }
            self.rows.append(row)
            added.append(row)
            if target is not None:
                what = f"{label or config_label(config)}: {subject} / {name}"
                self.target(problem, what, ratio, target[1], met)
        return added

    def target(
        self, problem: str, what: str, value: float | None, target: str, met: bool | None
    ) -> None:
        self.targets.append(
            {"problem": problem, "what": what, "value": _num(value), "target": target, "met": met}
        )

    @property
    def disagreements(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("agree") is False]

    @property
    def bilevel_failures(self) -> list[dict[str, Any]]:
        return [
            r for r in self.rows if r["implementation"].startswith("bilevel") and r.get("failed")
        ]


def config_label(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _agree_cell(row: dict[str, Any]) -> str:
    if row.get("failed"):
        return "FAILED"
    if row.get("reference"):
        return "ref"
    if row.get("agree") is None:
        return "n/a" if not row.get("checked", True) else "-"
    return "yes" if row["agree"] else "NO (DISAGREES)"


def _met_cell(row: dict[str, Any]) -> str:
    if row.get("met") is None:
        return ""
    return "ok" if row["met"] else "MISS"


def _target_cell(row: dict[str, Any]) -> str:
    return f"<={row['target_max_ratio']:.3g}" if row.get("target_max_ratio") is not None else ""


def _time_cells(row: dict[str, Any]) -> dict[str, str]:
    spread = row.get("spread")
    return {
        "median": core.fmt_time(row.get("median_s")) if not row.get("failed") else "-",
        "IQR": f"{100 * spread:.0f}%" if spread is not None else "-",
        "n": str(row.get("repeats", "")),
    }


def standard_cells(row: dict[str, Any]) -> dict[str, str]:
    return {
        "implementation": row["implementation"],
        **_time_cells(row),
        "rel.err": core.fmt_err(row.get("rel_error")),
        "agree": _agree_cell(row),
        "bilevel/impl": core.fmt_ratio(row.get("ratio")),
        "target": _target_cell(row),
        "met": _met_cell(row),
        "note": (row.get("failed") or row.get("note") or "")[:90],
    }


def log(settings: Settings, message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def targets_table(report: Report) -> str:
    rows = [
        {
            "problem": t["problem"],
            "what": t["what"],
            "value": "-" if t["value"] is None else f"{t['value']:.3g}",
            "target": t["target"],
            "met": "" if t["met"] is None else ("ok" if t["met"] else "MISS"),
        }
        for t in report.targets
    ]
    return core.format_table(rows, ["problem", "what", "value", "target", "met"], "== targets ==")
