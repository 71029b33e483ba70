"""The clinicians' evaluation report: the model against radiologist reads.

``build_report`` computes every number (aggregates only), ``write_clinical_report`` writes
``report.json``, the figures as PNG and a self-contained ``report.html``.
"""

from pipeline.evaluation.clinical.build import (
    REPORT_HTML,
    REPORT_JSON,
    ReportOptions,
    build_report,
    write_clinical_report,
)
from pipeline.evaluation.clinical.reads import ReadsError

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "ReadsError",
    "ReportOptions",
    "build_report",
    "write_clinical_report",
]
