"""Simulated cameras and the command line against real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_service.simulate.driver import SimulationConfig, run_simulation
from cl_service.simulate.surface import SurfaceConfig
from tests.conftest import XSDD_CLASSES, ServerHandle

pytestmark = pytest.mark.integration


def test_synthetic_cameras_stream_labeled_and_unlabeled_images(server: ServerHandle) -> None:
    config = SimulationConfig(
        target=server.target,
        cameras=2,
        count=60,
        labeled_fraction=0.5,
        seed=3,
        surface=SurfaceConfig(width=64, height=64, new_defect="crack", new_defect_after=30, new_defect_rate=0.5),
        run_id="t",
    )
    seen: list[str] = []
    summary = run_simulation(config, on_result=lambda _camera, result: seen.append(result.label))
    assert summary.failures == []
    assert summary.statuses["stored"] == 120 and summary.sent == 120
    store = server.running.core.store
    counts = store.counts()
    assert counts.samples == 120
    assert 30 <= 120 - counts.unlabeled <= 90  # about half carry their label
    assert "crack" in store.class_names()  # the new defect type appeared after image 30

    # The same run id resends the same images: nothing is stored twice.
    again = run_simulation(config)
    assert again.statuses["already_stored"] == 120
    assert store.counts().samples == 120


@pytest.mark.dataset
def test_a_folder_of_real_defect_images_streams_with_its_class_names(server: ServerHandle, datasets: Path) -> None:
    config = SimulationConfig(
        target=server.target, cameras=2, count=40, labeled_fraction=1.0, images=datasets / "xsdd", run_id="x"
    )
    summary = run_simulation(config)
    assert summary.failures == [] and summary.statuses["stored"] == 80
    names = set(server.running.core.store.class_names())
    assert names and names <= set(XSDD_CLASSES)


def test_the_demo_wants_a_fresh_data_folder_and_report_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The main job itself runs in test_demo.py; here its command line and `report`'s answers without a model."""
    from cl_service.cli import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "store.sqlite").write_bytes(b"")
    assert main(["demo", "--data-dir", str(used)]) == 2
    assert "is not empty" in " ".join(capsys.readouterr().out.split())
    assert main(["report", "--data-dir", str(tmp_path / "fresh")]) == 2
    assert "there is no live version yet" in capsys.readouterr().err
    assert main(["report", "v0009", "--data-dir", str(tmp_path / "fresh")]) == 2
    assert "no model version 'v0009'" in capsys.readouterr().err
