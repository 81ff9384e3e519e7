"""One self-contained HTML page per model version: what an operator and an ML engineer need to judge it.

The page shows the version and the gate's decision, the candidate's confusion matrix on the validation split,
per-class accuracy before (the live model at update time) and after with the forgetting of each old class, the
teacher's pseudo-labels, the anomaly scores of the images scored under the version with its threshold, example
alerts with their heatmaps, how long each stage of the update took, and the settings. Figures come from the
version's `report.json` (or, once its folder is pruned, the copy the store keeps in `model_versions.metrics`),
the store's predictions and alerts, and its anomaly model. Where something is missing the page says so.

Everything is inline (CSS, figures and images as base64 PNG): the file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlmodel import col

from cl_service import __version__
from cl_service.learning.metrics import Metrics
from cl_service.learning.repository import REPORT, ModelRepository, read_json
from cl_service.reports import charts
from cl_service.reports.anomaly_sections import alerts_section, anomaly_meta, anomaly_section
from cl_service.reports.html import Html, definitions, esc, image, join, note, page, table, tag, when
from replay_store.files import write_atomically
from replay_store.models import ModelVersionRow
from replay_store.store import Store

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
STAGES = ("snapshot", "teacher", "decode", "train", "validate", "build", "consolidate")  # run_update's order
NO_EARLIER_MODEL = "no earlier model to compare with"
COUNT_MEANINGS = {
    "samples": "images in the store when the update took its snapshot",
    "human_train": "human-labelled images in the training split (validation images excluded)",
    "validation": "validation images scored (human-labelled, of classes the candidate knows)",
    "new_labeled": "human-labelled images this update trained on (new since the parent; all on a first model)",
    "new_unlabeled": "unlabeled images new since the parent",
    "unlabeled_flagged_unknown": "of those, flagged by the inspector as possible unknown defects (left to operators)",
    "unlabeled_near_new_class": "of those, nearest to a labelled image of a class the teacher does not know",
    "pseudo_propagated": "of those, labelled as that class (their nearest labelled images agree); the rest left out",
    "pseudo_accepted": "pseudo-labels in all: the teacher's thresholds kept, plus the propagated",
    "replayed": "exemplars replayed from earlier updates",
}


class ReportError(Exception):
    """The report cannot be written: the version does not exist, or there is no live version to default to."""


# ---- entry points ----------------------------------------------------------------------------------------------


def live_version(repository: ModelRepository) -> str | None:
    """The version serving now (None before the first accepted model)."""
    row = repository.live()
    return None if row is None else row.version


def report_command(store: Store, repository: ModelRepository, version: str | None, out: Path | None) -> Path:
    """What `cl-service report [VERSION]` runs: the report of `version`, or of the live version when none is named."""
    if version is None:
        version = live_version(repository)
        if version is None:
            raise ReportError(f"there is no live version yet; {_known_versions(repository)}")
    return write_version_report(store, repository, version, out)


def write_version_report(store: Store, repository: ModelRepository, version: str, out: Path | None = None) -> Path:
    """Write the version's report to `out` (default: `report.html` in the version's folder), atomically."""
    row = repository.get(version) if _is_version_name(repository, version) else None
    if row is None:
        raise ReportError(f"no model version {version!r}; {_known_versions(repository)}")
    if out is None:
        if row.pruned_at is not None:
            raise ReportError(
                f"{version} was pruned: its folder is gone; give an output path to write its report "
                "from the figures the store kept"
            )
        out = repository.folder(version) / REPORT_HTML
    document = render_version_report(store, repository, row)
    write_atomically(out, document.encode("utf-8"))
    log.info("report of %s written to %s", version, out)
    return out


def render_version_report(store: Store, repository: ModelRepository, row: ModelVersionRow) -> str:
    """The whole page as a string."""
    context = _load(repository, row)
    sections: list[tuple[str, str, Callable[[], Html]]] = [
        ("confusion", "Confusion matrix", lambda: confusion_section(context)),
        ("accuracy", "Accuracy before and after", lambda: accuracy_section(context)),
        ("pseudo", "Pseudo-labels and update counts", lambda: pseudo_section(context.report, context.row)),
        ("anomaly", "Anomaly scores", lambda: anomaly_section(store, context.folder, row)),
        ("alerts", "Example alerts", lambda: alerts_section(store, context.folder, row)),
        ("timings", "Update timing", lambda: timings_section(context.report)),
        ("settings", "Settings", lambda: settings_section(context)),
    ]
    drawn = [(anchor, title, _safely(title, build)) for anchor, title, build in sections]
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    footer = f"written by cl-service {__version__} at {written}; figures from {context.source}"
    return str(page(f"cl-service model {row.version}", header_section(context), drawn, footer))


# ---- what the page is drawn from --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionContext:
    row: ModelVersionRow
    report: dict[str, Any]  # report.json (or the store's copy); {} when neither holds anything
    source: str  # where `report` came from, said on the page
    folder: Path
    parent_classes: list[str] | None  # the classes the live model knew at update time (None: unknown)


def _load(repository: ModelRepository, row: ModelVersionRow) -> VersionContext:
    folder = repository.folder(row.version)
    report: dict[str, Any] = {}
    source = "nothing: this version has no report"
    try:
        loaded = read_json(folder / REPORT)
    except (OSError, ValueError):
        loaded = None
    if isinstance(loaded, dict):
        report, source = loaded, str(folder / REPORT)
    elif row.metrics:
        report, source = dict(row.metrics), "the store's record of the version (its report.json is gone)"
    parent_classes = None
    if row.parent_version:
        parent = repository.get(row.parent_version)
        parent_classes = list(parent.classes) if parent is not None else None
    return VersionContext(row, report, source, folder, parent_classes)


def _is_version_name(repository: ModelRepository, version: str) -> bool:
    try:
        repository.folder(version)
    except ValueError:
        return False
    return True


def _known_versions(repository: ModelRepository) -> str:
    with repository.store.session() as session:
        rows = list(session.scalars(select(ModelVersionRow).order_by(col(ModelVersionRow.version))))
    if not rows:
        return "there are no model versions yet"
    return "known versions: " + ", ".join(f"{row.version} ({state_of(row)})" for row in rows)


def state_of(row: ModelVersionRow) -> str:
    """live, accepted, rejected or pruned."""
    if row.pruned_at is not None:
        return "pruned"
    return "live" if row.live else row.state


def _safely(title: str, build: Callable[[], Html]) -> Html:
    """A section that fails to draw (an old or damaged report) becomes a note; the rest of the page stays."""
    try:
        return build()
    except Exception as exc:  # one broken section must not cost the operator the whole page (logged)
        log.exception("the %r section of a version report failed", title)
        return note(f"This section could not be drawn: {type(exc).__name__}: {exc}")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _metrics(report: dict[str, Any], key: str) -> Metrics | None:
    data = report.get(key)
    return Metrics.from_dict(data) if isinstance(data, dict) else None


# ---- sections ------------------------------------------------------------------------------------------------------


def header_section(context: VersionContext) -> Html:
    row, report = context.row, context.report
    state = state_of(row)
    gate = report.get("gate") if isinstance(report.get("gate"), dict) else None
    title = tag("h1", join([esc(f"Model {row.version}"), tag("span", state, class_=f"badge {state}")]))
    classes = list(row.classes)
    new = [c for c in classes if context.parent_classes is not None and c not in context.parent_classes]
    facts: list[tuple[str, object]] = [
        ("parent", row.parent_version or "none (first model)"),
        ("state", state if state == row.state else f"{state} ({row.state})"),
        ("gate decision", _gate_decision(gate, row)),
        ("created", when(row.created_at)),
    ]
    if row.activated_at is not None:
        facts.append(("last made live", when(row.activated_at)))
    if row.pruned_at is not None:
        facts.append(("pruned", f"{when(row.pruned_at)} (its folder was deleted by retention)"))
    facts.append((f"classes ({len(classes)})", ", ".join(classes) or "none"))
    if context.parent_classes is not None:
        facts.append(("new in this version", ", ".join(new) or "none"))
    reasons = [str(r) for r in gate.get("reasons", [])] if gate else []
    if not reasons and row.rejection_reason:
        reasons = [row.rejection_reason]
    parts = [title, definitions(facts)]
    if reasons:
        parts += [tag("h3", "Reasons and notes of the gate"), _bullets(reasons)]
    else:
        parts.append(note("The gate recorded no reasons for this version."))
    if not report:
        parts.append(note("This version has no report (no report.json and no metrics in the store)."))
    return Html(f'<header class="report">{join(parts)}</header>')


def _gate_decision(gate: dict[str, Any] | None, row: ModelVersionRow) -> str:
    if gate is None:
        return f"{row.state} (the report holds no gate details)"
    verdict = "accepted" if gate.get("accepted") else "rejected"
    tolerance = gate.get("tolerance")
    return verdict + (f" (tolerance {100 * float(tolerance):.1f} points)" if tolerance is not None else "")


def _bullets(items: Sequence[str]) -> Html:
    return tag("ul", join(tag("li", item) for item in items), class_="reasons")


def confusion_section(context: VersionContext) -> Html:
    candidate = _metrics(context.report, "candidate")
    if candidate is None:
        return note(
            "The candidate was not scored: there were no validation images of its classes, so there is no "
            "confusion matrix for this version."
        )
    classes, confusion = candidate.classes, candidate.confusion
    figure = image(charts.confusion_matrix(classes, confusion), f"confusion matrix of {context.row.version}")
    return join(
        [
            tag(
                "p",
                f"The candidate on {candidate.n} validation images (never trained on). Rows: true class; "
                "columns: predicted class. Colour: share of the true class; numbers: image counts.",
            ),
            figure,
            matrix_table(classes, confusion),
        ]
    )


def matrix_table(classes: Sequence[str], confusion: Sequence[Sequence[int]]) -> Html:
    """The confusion counts as a table: a row per true class with its total and recall, diagonal in bold."""
    head = "".join(f'<th class="num">{esc(name)}</th>' for name in classes)
    rows = []
    for i, name in enumerate(classes):
        cells = "".join(
            f'<td class="num{" diag" if i == j else ""}">{int(count)}</td>' for j, count in enumerate(confusion[i])
        )
        total = sum(int(v) for v in confusion[i])
        recall = pct(int(confusion[i][i]) / total) if total else "n/a"
        rows.append(f'<tr><th>{esc(name)}</th>{cells}<td class="num">{total}</td><td class="num">{recall}</td></tr>')
    return Html(
        '<table class="matrix"><thead><tr><th>true \\ predicted</th>'
        f'{head}<th class="num">total</th><th class="num">recall</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def accuracy_section(context: VersionContext) -> Html:
    candidate, live = _metrics(context.report, "candidate"), _metrics(context.report, "live")
    if candidate is None:
        return note("The candidate was not scored (no validation images): no accuracy to show.")
    classes = candidate.classes
    after = [candidate.per_class[c].accuracy if c in candidate.per_class else None for c in classes]
    parent = context.row.parent_version
    old = _old_classes(context, live)
    parts: list[Html] = []
    series: dict[str, Sequence[float | None]]
    colours: tuple[str, ...]
    if live is None:
        why = "this is the first model" if parent is None else f"{parent} was not scored on these images"
        parts.append(note(f"There is {NO_EARLIER_MODEL}: {why}. Only the candidate's accuracy is shown."))
        series, colours = {f"{context.row.version} (after)": after}, (charts.AFTER_COLOUR,)
    else:  # a class new in this version has no "before": the earlier model could not name it
        before = [live.per_class[c].accuracy if c in old and c in live.per_class else None for c in classes]
        series = {f"{parent or 'live'} (before)": before, f"{context.row.version} (after)": after}
        colours = (charts.BEFORE_COLOUR, charts.AFTER_COLOUR)
    chart = charts.grouped_bars(classes, series, ylabel="accuracy (recall) %", percent=True, colours=colours)
    parts.append(image(chart, "per-class accuracy before and after"))
    parts.append(_per_class_table(candidate, live, old))
    if live is not None:
        parts.append(_forgetting(candidate, live, old))
    parts.append(tag("h3", "Overall"))
    parts.append(_overall_table(candidate, live, old))
    return join(parts)


def _old_classes(context: VersionContext, live: Metrics | None) -> list[str]:
    if live is None:
        return []
    if context.parent_classes is not None:
        return [c for c in live.classes if c in context.parent_classes]
    return list(live.classes)  # the parent's row is gone: treat every class as old (said on the page)


def _per_class_table(candidate: Metrics, live: Metrics | None, old: Sequence[str]) -> Html:
    rows: list[list[object]] = []
    for name in candidate.classes:
        now = candidate.per_class[name]
        was = live.per_class.get(name) if live is not None and name in old else None
        change = None if was is None or was.accuracy is None or now.accuracy is None else now.accuracy - was.accuracy
        if live is None:
            kind, before = "", "n/a"
        elif name in old:
            kind, before = "old", pct(was.accuracy if was else None)
        else:
            kind, before = "new in this version", "not known before"
        rows.append([name, kind, now.support, before, pct(now.accuracy), points(change)])
    headers = ["class", "", "validation images", "before", "after", "change (points)"]
    return table(headers, rows, numeric=(2, 3, 4, 5))


def _forgetting(candidate: Metrics, live: Metrics, old: Sequence[str]) -> Html:
    """Forgetting of each old class: its accuracy before minus after (positive: the candidate forgot)."""
    drops = {}
    for name in old:
        before, after = live.per_class[name].accuracy, candidate.per_class[name].accuracy
        if before is not None and after is not None:
            drops[name] = before - after
    if not drops:
        return note("No old class has validation images: forgetting cannot be measured.")
    average = sum(drops.values()) / len(drops)
    rows = [[name, points(value)] for name, value in drops.items()]
    rows.append([Html("<strong>average</strong>"), Html(f"<strong>{esc(points(average))}</strong>")])
    return join(
        [
            tag("h3", "Forgetting of the old classes"),
            tag(
                "p",
                "Accuracy before minus after, in points: positive means the candidate forgot, negative that "
                "it improved.",
            ),
            table(["old class", "forgetting (points)"], rows, numeric=(1,)),
        ]
    )


def _overall_table(candidate: Metrics, live: Metrics | None, old: Sequence[str]) -> Html:
    def row(name: str, before: float | None, after: float | None) -> list[object]:
        change = None if before is None or after is None else after - before
        return [name, pct(before), pct(after), points(change)]

    rows = [
        row("accuracy", live.accuracy if live else None, candidate.accuracy),
        row("macro-F1", live.macro_f1 if live else None, candidate.macro_f1),
    ]
    if live is not None and old and len(old) < len(candidate.classes):
        rows.append(row("accuracy on the old classes only", _accuracy_on(live, old), _accuracy_on(candidate, old)))
    parts = [table(["", "before", "after", "change (points)"], rows, numeric=(1, 2, 3))]
    parts.append(tag("p", f"{candidate.n} validation images."))
    if live is not None and len(old) < len(candidate.classes):
        parts.append(
            note(
                "The earlier model cannot predict the classes new in this version, so its overall figures "
                "count those images as wrong; the old-classes row compares like with like."
            )
        )
    return join(parts)


def _accuracy_on(metrics: Metrics, classes: Sequence[str]) -> float | None:
    index = [metrics.classes.index(c) for c in classes if c in metrics.classes]
    total = sum(sum(metrics.confusion[i]) for i in index)
    return sum(metrics.confusion[i][i] for i in index) / total if total else None


def pseudo_section(report: dict[str, Any], row: ModelVersionRow) -> Html:
    parts: list[Html] = [tag("h3", "Pseudo-labels per class")]
    judged_raw, accepted_raw = report.get("pseudo_judged"), report.get("pseudo_accepted")
    judged = {str(k): int(v) for k, v in judged_raw.items()} if isinstance(judged_raw, dict) else None
    accepted = {str(k): int(v) for k, v in accepted_raw.items()} if isinstance(accepted_raw, dict) else {}
    propagated_raw = report.get("pseudo_propagated")
    propagated = {str(k): int(v) for k, v in propagated_raw.items()} if isinstance(propagated_raw, dict) else {}
    if row.parent_version is None:
        parts.append(note("This is the first model: there was no teacher, so no pseudo-labels."))
    elif not accepted and not judged and not propagated:
        parts.append(
            note(
                "The teacher kept no pseudo-labels in this update (no new unlabeled images it was asked "
                "about, or none passed its thresholds)."
            )
        )
    if row.parent_version is not None:
        if judged is None:
            parts.append(
                note(
                    "This report predates the per-class count of images the teacher judged: only kept "
                    "pseudo-labels are shown, without acceptance rates."
                )
            )
        parts.append(pseudo_table(list(row.classes), judged, accepted, propagated))
        if any(accepted.values()) or any(propagated.values()) or (judged and any(judged.values())):
            names = _ordered(list(row.classes), [*(judged or {}), *accepted, *propagated])
            series: dict[str, Sequence[float | None]] = {"kept": [accepted.get(n, 0) for n in names]}
            if propagated:
                series["propagated"] = [propagated.get(n, 0) for n in names]
            if judged is not None:
                series = {"judged (teacher's top class)": [judged.get(n, 0) for n in names], **series}
            parts.append(image(charts.grouped_bars(names, series, ylabel="images"), "pseudo-labels per class"))
    parts += [tag("h3", "What the update worked with"), counts_table(report.get("counts"))]
    return join(parts)


def _ordered(classes: Sequence[str], names: Sequence[str]) -> list[str]:
    """The model's class order, then any other name (an older report's class) in sorted order."""
    return [c for c in classes] + sorted(set(names) - set(classes))


def pseudo_table(
    classes: Sequence[str],
    judged: dict[str, int] | None,
    accepted: dict[str, int],
    propagated: dict[str, int] | None = None,
) -> Html:
    """Per class: images the teacher judged as that class, pseudo-labels it kept, and the share kept; then the
    labels propagated from a new class's labelled images (images the teacher did not judge), when there are any."""
    propagated = propagated or {}
    extra = bool(propagated)
    rows: list[list[object]] = []
    for name in _ordered(classes, [*(judged or {}), *accepted, *propagated]):
        kept = accepted.get(name, 0)
        tail: list[object] = [propagated.get(name, 0)] if extra else []
        if judged is None:
            rows.append([name, kept, *tail])
            continue
        seen = judged.get(name, 0)
        rows.append([name, seen, kept, pct(kept / seen) if seen else "n/a", *tail])
    total_kept = sum(accepted.values())
    total_tail: list[object] = [sum(propagated.values())] if extra else []
    column: list[str] = ["propagated (new class's neighbours)"] if extra else []
    if judged is None:
        return table(["class", "kept", *column], [*rows, ["total", total_kept, *total_tail]], numeric=(1, 2))
    total_seen = sum(judged.values())
    rows.append(["total", total_seen, total_kept, pct(total_kept / total_seen) if total_seen else "n/a", *total_tail])
    headers = ["class", "judged (teacher's top class)", "kept", "acceptance rate", *column]
    return table(headers, rows, numeric=(1, 2, 3, 4))


def counts_table(counts: object) -> Html:
    if not isinstance(counts, dict) or not counts:
        return note("The report holds no counts.")
    keys = [k for k in COUNT_MEANINGS if k in counts] + sorted(k for k in counts if k not in COUNT_MEANINGS)
    rows = [[key, counts[key], COUNT_MEANINGS.get(key, "")] for key in keys]
    return table(["count", "images", "meaning"], rows, numeric=(1,))


def timings_section(report: dict[str, Any]) -> Html:
    timings_raw = report.get("timings")
    if not isinstance(timings_raw, dict) or not timings_raw:
        return note("The report holds no timings.")
    timings = {str(k): float(v) for k, v in timings_raw.items()}
    extra = sorted(s for s in timings if s not in STAGES)
    order = [s for s in (*STAGES, *extra) if s in timings]
    total = sum(timings.values())
    rows: list[list[object]] = []
    for stage in (*STAGES, *extra):
        if stage in timings:
            rows.append([stage, f"{timings[stage]:.2f}", pct(timings[stage] / total) if total else "n/a"])
        else:
            rows.append([stage, "not run", ""])
    rows.append([Html("<strong>total</strong>"), Html(f"<strong>{total:.2f}</strong>"), ""])
    chart = charts.horizontal_bars({s: timings[s] for s in order}, xlabel="seconds")
    return join(
        [
            image(chart, "seconds per update stage"),
            table(["stage", "seconds", "share"], rows, numeric=(1, 2)),
            note(
                "build runs only when the update checks the candidate's inference engine; consolidate only when "
                "the candidate is accepted. The anomaly model is fitted after the update and is not counted here."
            ),
        ]
    )


def settings_section(context: VersionContext) -> Html:
    meta, _ = anomaly_meta(context.folder)
    blocks = [
        ("update settings", context.report.get("settings")),
        ("model config", context.row.config),
        ("anomaly model config", meta.get("config") if meta else None),
    ]
    parts = []
    for title, value in blocks:
        if value:
            text = json.dumps(value, indent=2, sort_keys=True, default=str)
            parts.append(Html(f"<details><summary>{esc(title)}</summary><pre>{esc(text)}</pre></details>"))
        else:
            parts.append(note(f"No {title} recorded."))
    return join(parts)
