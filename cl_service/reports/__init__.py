"""Reports for people: one self-contained HTML page per model version (`write_version_report`)."""

from cl_service.reports.version_report import (
    REPORT_HTML,
    ReportError,
    live_version,
    render_version_report,
    report_command,
    write_version_report,
)

__all__ = [
    "REPORT_HTML",
    "ReportError",
    "live_version",
    "render_version_report",
    "report_command",
    "write_version_report",
]
