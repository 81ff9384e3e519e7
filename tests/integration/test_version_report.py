"""The HTML report of a model version, from a real store, two real (tiny) updates and a real anomaly model."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cl_service.anomaly.config import AnomalyConfig
from cl_service.anomaly.model import AnomalyModel
from cl_service.inspector import ANOMALY_DIR, embed_and_classify, fit_anomaly
from cl_service.learning.repository import REPORT, ModelRepository
from cl_service.learning.update import run_update
from cl_service.reports import REPORT_HTML, ReportError, report_command, write_version_report
from cl_service.reports.charts import grouped_bars
from cl_service.reports.html import table
from cl_service.reports.version_report import matrix_table, pseudo_table
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from replay_store.models import Alert, AlertState, PredictionRow, utcnow
from replay_store.operator import save_predictions
from replay_store.store import NewSample, Store
from tests.conftest import TINY_UPDATE, store_url

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANOMALY = AnomalyConfig(image_size=32, channels=(8, 16, 32), min_steps=40, epochs=1)
SIDE = 48


def _ingest(store: Store, classes: tuple[str, ...], count: int, *, start: int, labeled_every: int) -> list[int]:
    generator = SurfaceGenerator(SurfaceConfig(width=SIDE, height=SIDE, classes=classes, seed=start))
    batch = []
    for image in generator.stream(0, count):
        data = encode_image(image.pixels)
        label = image.label if image.index % labeled_every == 0 else None
        digest = hashlib.sha256(data).hexdigest()
        batch.append(NewSample("cam-1", f"r{start + image.index}", digest, "png", SIDE, SIDE, data, label=label))
    return [stored.sample_id for stored in store.add_samples(batch)]


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts; every <img> as its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append({k: v or "" for k, v in attrs})

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None


def _parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def _table_with(parsed: _Tables, *headers: str) -> list[list[str]]:
    for rows in parsed.tables:
        if rows and all(h in rows[0] for h in headers):
            return rows
    raise AssertionError(f"no table with the headers {headers}")


def _row(rows: list[list[str]], first: str) -> list[str]:
    return next(row for row in rows if row[0] == first)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    picture.load()
    assert picture.format == "PNG"
    return picture


def _score(store: Store, repository: ModelRepository, version: str, sample_ids: list[int]) -> list[PredictionRow]:
    """What the inspector would record: the version's real anomaly scores of these samples."""
    model = repository.load_model(version)
    anomaly = AnomalyModel.load(repository.folder(version) / ANOMALY_DIR)
    samples = [store.get_sample(i) for i in sample_ids]
    images = [store.read_blob(s.sha256) for s in samples if s is not None]
    embeddings, _ = embed_and_classify(model, images)
    scores = anomaly.score(images, embeddings)
    return [
        PredictionRow(
            sample_id=sample_id,
            model_version=version,
            class_name=model.classes[0],
            confidence=0.9,
            margin=0.5,
            top_classes={model.classes[0]: 0.9},
            anomaly_score=float(scores.combined[i]),
            anomaly_threshold=float(scores.threshold),
            anomalous=bool(scores.anomalous[i]),
            created_at=utcnow(),
        )
        for i, sample_id in enumerate(sample_ids)
    ]


def test_version_reports_show_the_update_the_anomaly_model_and_the_alerts(tmp_path: Path) -> None:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    repository = ModelRepository(tmp_path / "models", store)
    with pytest.raises(ReportError, match="no live version yet; there are no model versions yet"):
        report_command(store, repository, None, None)

    _ingest(store, ("good", "scratch"), 40, start=0, labeled_every=1)
    assert run_update(store, repository, TINY_UPDATE).version == "v0001"
    _ingest(store, ("good", "scratch", "pit"), 48, start=1000, labeled_every=2)
    second = run_update(store, repository, TINY_UPDATE)
    assert second.version == "v0002" and second.accepted, second.reasons
    assert fit_anomaly(store, repository, "v0002", TINY_UPDATE, config=ANOMALY) is not None

    # Images scored under v0002: labelled with its classes, with a class it does not know (crack), and unlabeled.
    snapshot = store.snapshot()
    known = [r.sample_id for r in snapshot.human if r.label in ("good", "pit")][:6]
    unlabeled = [r.sample_id for r in snapshot.unlabeled][:5]
    cracks = _ingest(store, ("crack",), 4, start=5000, labeled_every=1)
    save_predictions(store, _score(store, repository, "v0002", [*known, *unlabeled, *cracks]))
    with store.session() as session:
        session.add(
            Alert(
                kind="unknown_defect",
                state=AlertState.OPEN.value,
                camera_id="cam-<b>7</b>",
                count=len(cracks),
                example_sample_ids=cracks,
                max_score=9.5,
                threshold=1.25,
                model_version="v0002",
                first_seen=utcnow(),
                last_seen=utcnow(),
            )
        )
        session.commit()

    path = report_command(store, repository, None, None)  # no version named: the live one
    assert path == repository.folder("v0002") / REPORT_HTML
    page = path.read_text(encoding="utf-8")
    report: dict[str, Any] = json.loads((repository.folder("v0002") / REPORT).read_text())
    parsed = _parse(page)

    # self-contained: no script, no external resource; every figure an inline PNG
    assert "<script" not in page.lower() and not re.search(r"(src|href)=\"(https?:)?//", page)
    assert all(_png(img["src"]) for img in parsed.images)
    assert "cam-&lt;b&gt;7&lt;/b&gt;" in page  # user text is escaped

    # header
    assert "Model v0002" in page and "v0001" in page and 'class="badge live"' in page
    for reason in report["gate"]["reasons"]:
        assert escape(reason) in page

    # confusion matrix: the counts of report.json, row by row, and its heatmap
    candidate, live = report["candidate"], report["live"]
    matrix = _table_with(parsed, "true \\ predicted", "recall")
    assert matrix[0][1 : 1 + len(candidate["classes"])] == candidate["classes"]
    for name, counts in zip(candidate["classes"], candidate["confusion"], strict=True):
        assert _row(matrix, name)[1 : 1 + len(counts)] == [str(c) for c in counts]
    assert any(img["alt"] == "confusion matrix of v0002" for img in parsed.images)

    # per-class accuracy before (v0001) and after (v0002), and the forgetting of the old classes
    per_class = _table_with(parsed, "before", "after", "validation images")
    for name in ("good", "scratch"):
        row = _row(per_class, name)
        assert row[1:5] == [
            "old",
            str(candidate["per_class"][name]["support"]),
            _pct(live["per_class"][name]["accuracy"]),
            _pct(candidate["per_class"][name]["accuracy"]),
        ], row
    pit = _row(per_class, "pit")
    assert pit[1] == "new in this version" and pit[3] == "not known before", pit
    assert pit[4] == _pct(candidate["per_class"]["pit"]["accuracy"])
    forgetting = _table_with(parsed, "old class", "forgetting (points)")
    assert {row[0] for row in forgetting[1:]} == {"good", "scratch", "average"}
    overall = next(rows for rows in parsed.tables if rows[0] == ["", "before", "after", "change (points)"])
    assert _row(overall, "accuracy")[1:3] == [_pct(live["accuracy"]), _pct(candidate["accuracy"])]

    # pseudo-labels: what the teacher judged and kept, per class; the update's counts
    assert report["pseudo_judged"], "the teacher judged no image"
    pseudo = _table_with(parsed, "judged (teacher's top class)", "kept", "acceptance rate")
    for name, judged in report["pseudo_judged"].items():
        assert _row(pseudo, name)[1:3] == [str(judged), str(report["pseudo_accepted"].get(name, 0))]
    for name, count in report["pseudo_propagated"].items():  # labels taken from a new class's neighbours
        assert _row(pseudo, name)[4] == str(count)
    counts = _table_with(parsed, "count", "images", "meaning")
    for key, value in report["counts"].items():
        assert _row(counts, key)[1] == str(value)

    # anomaly scores: the threshold of the saved model, the three groups, above-threshold counts
    meta = json.loads((repository.folder("v0002") / ANOMALY_DIR / "anomaly.json").read_text())
    threshold = meta["calibration"]["threshold"]
    assert f"{threshold:.4f}" in page
    groups = _table_with(parsed, "images with", "above threshold")
    assert [row[1] for row in groups[1:]] == [str(len(known)), str(len(cracks)), str(len(unlabeled))]
    with store.session() as session:
        rows = [session.get(PredictionRow, i) for i in cracks]
    above = sum(1 for r in rows if r is not None and r.anomaly_score is not None and r.anomaly_score > threshold)
    assert _row(groups, "class it does not know")[3] == str(above)
    assert any(img["alt"] == "anomaly scores under v0002" for img in parsed.images)

    # the alert, its examples (at most 3) side by side with their heatmaps
    heatmaps = [img for img in parsed.images if img.get("class") == "heatmap"]
    thumbs = [img for img in parsed.images if img.get("class") == "thumb"]
    assert len(heatmaps) == len(thumbs) == 3
    for img in heatmaps + thumbs:
        assert max(_png(img["src"]).size) <= 200
    assert "Alert #1" in page and "9.5000 (threshold 1.2500)" in page

    # timings: every stage's seconds and the total
    timing = _table_with(parsed, "stage", "seconds")
    for stage, seconds in report["timings"].items():
        assert _row(timing, stage)[1] == f"{seconds:.2f}"
    assert _row(timing, "total")[1] == f"{sum(report['timings'].values()):.2f}"
    assert _row(timing, "build")[1] == "not run"  # no engine check in this update
    for title in ("update settings", "model config", "anomaly model config"):
        assert f"<details><summary>{title}</summary>" in page

    # the first model: nothing to compare with, no teacher, no anomaly model, no predictions
    first = write_version_report(store, repository, "v0001", tmp_path / "v0001.html").read_text(encoding="utf-8")
    assert "no earlier model to compare with" in first
    assert "no teacher, so no pseudo-labels" in first
    assert "no anomaly model for this version" in first
    assert "No image has a prediction under v0001" in first and "No alerts were raised under v0001" in first
    assert "could not be drawn" not in first + page

    with pytest.raises(
        ReportError, match=r"no model version 'v0042'; known versions: v0001 \(accepted\), v0002 \(live\)"
    ):
        write_version_report(store, repository, "v0042")
    with pytest.raises(ReportError, match="known versions"):
        report_command(store, repository, "../etc", None)

    # pruned: its folder is gone, the store's copy of its figures still makes a report (to a path given)
    assert repository.prune(1) == ["v0001"]
    with pytest.raises(ReportError, match="v0001 was pruned"):
        write_version_report(store, repository, "v0001")
    pruned = write_version_report(store, repository, "v0001", tmp_path / "pruned.html").read_text(encoding="utf-8")
    assert 'class="badge pruned"' in pruned and "its report.json is gone" in pruned and "folder is gone" in pruned
    assert not repository.folder("v0001").exists()
    store.close()


def test_the_pseudo_label_table_shows_propagated_labels_beside_the_teachers() -> None:
    rows = _table_with(
        _parse(str(pseudo_table(["crack", "pit"], {"crack": 10}, {"crack": 8}, {"pit": 5}))),
        "judged (teacher's top class)",
        "propagated (new class's neighbours)",
    )
    assert rows[1:] == [
        ["crack", "10", "8", "80.0%", "0"],
        ["pit", "0", "0", "n/a", "5"],
        ["total", "10", "8", "80.0%", "5"],
    ]
    plain = _parse(str(pseudo_table(["crack"], {"crack": 10}, {"crack": 8})))  # nothing propagated: no column
    assert _table_with(plain, "judged (teacher's top class)")[0] == [
        "class",
        "judged (teacher's top class)",
        "kept",
        "acceptance rate",
    ]


def test_user_text_is_escaped_in_tables_and_drawn_literally_in_figures() -> None:
    hostile = '<script>alert("x")</script>'
    page = str(table(["class"], [[hostile]])) + str(matrix_table([hostile], [[3]]))
    page += str(pseudo_table([hostile], {hostile: 4}, {hostile: 2}))
    assert (
        "<script" not in page and page.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") == 4
    )  # the matrix names it twice
    png = grouped_bars(["cost $5", "$x$ <b>"], {"after": [0.5, None]}, ylabel="%", percent=True)
    assert Image.open(io.BytesIO(png)).format == "PNG"
