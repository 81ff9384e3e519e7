"""The main job (`make run`), shortened (`--quick`): the story of a new defect, through the real server, scheduler,
worker processes, inspector and engines. Known `good` and `crack` parts stream in and the first model is trained;
`pit` (small dark spots) starts appearing and raises alerts while known parts rarely do; a simulated operator labels
ten alerted pits from the review queue; the update learns the new class, passes the gate (or, rejected, the next
update does, with more labels) and is hot-swapped in; fresh pits are classified as pits and raise fewer alerts; every
version has its HTML report.

Recall and false-alarm rate are printed (`pytest -s`). bench/unknown_defect.py measures real defects.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cl_service.config import load_settings
from cl_service.demo import DemoPlan, quiet_console, run_demo, summary

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.story, pytest.mark.timeout(900)]


def test_the_main_job_learns_a_new_defect_type_and_reports_it(tmp_path: Path) -> None:
    console = quiet_console()
    settings = load_settings(data_dir=tmp_path / "data")
    outcome = run_demo(settings, DemoPlan.quick(), console=console)
    print("\n" + summary(outcome))

    # the first model went live, then one that knows the new class: the next update's candidate, or (when the gate
    # rejected that one) the one after it, trained with more labels
    assert outcome.first_version == "v0001"
    assert len(outcome.rejected) < DemoPlan.quick().attempts
    assert outcome.final_version == f"v{2 + len(outcome.rejected):04d}", outcome.rejected
    assert set(outcome.final_per_class) == {"crack", "good", "pit"}
    # the new type was noticed before it was learned, known parts rarely alerted
    assert outcome.recall_before >= 0.45 and outcome.false_alarm_rate <= 0.05, outcome
    assert outcome.alerts_raised >= 1
    # learned: fresh pits are called pits, and alert less
    assert outcome.learned >= 0.7, outcome
    assert outcome.recall_after <= 0.7 * outcome.recall_before, outcome
    # old classes within the gate's tolerance: the gate accepted it (it went live); and they still work (the
    # shortened run's first model has crack at 70-90% on about 30 validation images)
    assert all(outcome.final_per_class[name] >= 0.6 for name in ("good", "crack")), outcome.final_per_class

    # each version's report exists and holds its figures
    assert set(outcome.report_paths) == set(outcome.versions) >= {"v0001", outcome.final_version}
    page = outcome.report_paths[outcome.final_version].read_text()
    for name in ("crack", "good", "pit"):
        assert name in page
    assert f"{outcome.final_per_class['pit']:.1%}" in page or f"{outcome.final_per_class['pit']:.0%}" in page
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) >= 4  # figures and alert heatmaps
    assert "v0001" in page  # its parent

    # the terminal view walked through every step and said where things are
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "6/6" in shown and "is live" in shown
    assert str(outcome.data_dir) in summary(outcome)
