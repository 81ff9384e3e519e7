"""`cl-service eval-stream`: a folder replayed as a class-incremental camera stream through the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cl_service.cli import main
from cl_service.evaluation.references import Recipe
from cl_service.evaluation.runner import StreamSpec, evaluate_stream, load_stream
from cl_service.evaluation.stream import StreamPlan
from cl_service.learning.settings import ModelConfig, UpdateSettings
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from tests.conftest import sqlite_only

# eval-stream keeps its own SQLite store whatever the environment says: the PostgreSQL run would repeat it as is
pytestmark = [pytest.mark.integration, pytest.mark.slow, sqlite_only]

CLASSES = ("good", "scratch", "pit")


def _folder(root: Path, per_class: int) -> Path:
    generator = SurfaceGenerator(SurfaceConfig(width=48, height=48, classes=CLASSES, class_weights=(1, 1, 1)))
    written = dict.fromkeys(CLASSES, 0)
    for image in generator.stream(0, None):
        if written[image.label] < per_class:
            folder = root / image.label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{image.index:04d}.png").write_bytes(encode_image(image.pixels))
            written[image.label] += 1
        if min(written.values()) >= per_class:
            return root
    raise AssertionError("unreachable")


def test_eval_stream_runs_ours_with_and_without_unlabeled_images_beside_a_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # two optimiser steps cannot promise a good first model: this test is about the plumbing, so the first
    # model goes live whatever its validation accuracy (the [update] settings reach eval-stream from the env)
    monkeypatch.setenv("CL_SERVICE_UPDATE__COLD_START_MIN_ACCURACY", "0")
    monkeypatch.setenv("CL_SERVICE_UPDATE__MIN_STEPS", "1")
    folder = _folder(tmp_path / "images", per_class=40)
    out = tmp_path / "out"
    code = main(
        [
            "eval-stream",
            str(folder),
            "--steps",
            "2,1",
            "--labeled-fraction",
            "0.5",
            "--labels-only",
            "--references",
            "naive",
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--replay-per-class",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads((out / "stream_eval.json").read_text())
    assert [r["strategy"] for r in report["results"]] == ["ours", "ours_labels_only", "naive"]
    assert sorted(c for step in report["steps"] for c in step) == sorted(CLASSES)
    ours, labels_only, naive = report["results"]
    for result in (ours, labels_only, naive):
        assert len(result["accuracy_matrix"]) == 2
        assert len(result["seen_accuracy"]) == 2
        assert 0.0 <= result["final_accuracy"] <= 1.0
    # 28 train images per class (30% of 40 are test); half of each class is sent labeled, the rest unlabeled
    first = ours["details"][0]
    assert first["sent_labeled"] == 28 and first["sent_unlabeled"] == 28
    assert labels_only["details"][0]["sent_unlabeled"] == 0
    assert first["accepted"], first["reasons"]
    assert ours["per_class"] and set(ours["per_class"]) <= set(CLASSES)
    # the second update had the first model as teacher for the unlabeled images, whose true labels are known: the
    # first model learnt from labels only, so the first step's 28 unlabeled images wait for it beside the 14 new
    second = ours["details"][1]
    assert second["counts"]["new_unlabeled"] == 28 + 14
    assert 0 <= second["pseudo_correct"] <= second["pseudo_labels"]
    # this run gates with the defaults, so the recorded default-gate verdict is the update's own
    assert second["default_gate_accepts"] == second["accepted"], second["reasons"]
    assert "default_gate_accepts" not in first  # a first model has no live model to be gated against
    assert (out / "data" / "ours" / "store.sqlite").exists()
    with Image.open(out / "stream_eval.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 600
    table = (out / "stream_eval.md").read_text()
    assert "| ours |" in table and "| naive |" in table
    assert "wrote" in capsys.readouterr().out


def test_a_plans_update_seed_and_classifier_replace_the_settings_for_its_updates(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images", per_class=12)
    spec = StreamSpec(folder, (3,))
    settings = UpdateSettings(
        model=ModelConfig(image_size=32), epochs=1, min_steps=1, cold_start_min_accuracy=0.0, seed=0
    )
    stream = load_stream(spec, settings)
    plans = [("ours", StreamPlan(1.0)), ("ours_seed1", StreamPlan(1.0, update_seed=1, classifier="trained"))]
    evaluation = evaluate_stream(
        stream, spec, settings=settings, plans=plans, references=[], recipe=Recipe(), work_dir=tmp_path / "work"
    )
    used = {}
    for name, _ in plans:
        version = evaluation.result(name).details[0]["version"]
        report = json.loads((tmp_path / "work" / name / "models" / version / "report.json").read_text())
        used[name] = (report["settings"]["seed"], report["settings"]["classifier"])
    assert used == {"ours": (0, "lda"), "ours_seed1": (1, "trained")}
    with pytest.raises(ValueError, match="classifier must be"):
        StreamPlan(1.0, classifier="linear")  # type: ignore[arg-type]


def test_eval_stream_refuses_step_sizes_that_do_not_cover_the_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path / "images", per_class=3)
    assert main(["eval-stream", str(folder), "--steps", "2,2", "--out", str(tmp_path / "out")]) == 2
    assert "step sizes (2, 2) must be positive and sum to the 3 classes" in capsys.readouterr().err
