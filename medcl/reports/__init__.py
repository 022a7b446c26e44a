"""Clinical evaluation reports and the tidy-DataFrame results API for notebooks."""

from __future__ import annotations

from medcl.reports.compare import align_rows, compare_tables
from medcl.reports.failures import confident_errors, thumbnail_png
from medcl.reports.predictions import SAFE_COLUMNS, Predictions
from medcl.reports.report import Report, build_report, write_report
from medcl.reports.results import RunResults

__all__ = [
    "SAFE_COLUMNS",
    "Predictions",
    "Report",
    "RunResults",
    "align_rows",
    "build_report",
    "compare_tables",
    "confident_errors",
    "thumbnail_png",
    "write_report",
]
