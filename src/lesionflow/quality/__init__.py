"""Quality gates: Great Expectations suites over per-case metadata tables, with HTML/JSON/console reports.

Importing this package is cheap: Great Expectations (~3 s to import) and pandas are loaded only when a
gate runs, so ``lesionflow --help`` does not pay for them.
"""

from __future__ import annotations

from lesionflow.quality.gate import run_gate
from lesionflow.quality.raw_suite import raw_expectations, run_raw_gate
from lesionflow.quality.report import print_result, render_console, summary_dict, verdict
from lesionflow.quality.result import FailedCheck, GatePolicy, GateResult

__all__ = [
    "FailedCheck",
    "GatePolicy",
    "GateResult",
    "print_result",
    "raw_expectations",
    "render_console",
    "run_gate",
    "run_raw_gate",
    "summary_dict",
    "verdict",
]
