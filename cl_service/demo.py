"""The main job (`make run`, `cl-service demo`): the whole loop, end to end, on embedded defaults.

A real server runs in this process (SQLite and blob files in the data folder, ONNX Runtime, the scheduler, the
inspector); everything else talks to it over gRPC on loopback, as cameras and operators would:

1. day one: cameras stream parts of the known classes, some labelled at the camera; the operator asks for the
   first update (cold start) and the first model goes live;
2. the line runs: known parts, unlabelled, and now a defect type nobody has seen; the inspector scores every
   image and the unknown ones raise alerts (recall and false-alarm rate measured against the truth the
   simulation knows);
3. a simulated operator works the review queue: looks at the anomalous images, labels those of the new type
   (naming a new class) and acknowledges the alert; the reject chute sends some more, labelled;
4. the operator asks for an update: teacher pseudo-labels, replay + EWC training, the validation gate, the
   engine build; the server hot-swaps to the new version;
5. fresh images of the new type: how many are now classified as it, and how many still alert.

Each version's HTML report is written by its update; the data folder and the reports stay behind.
Images: the simulation's procedural metal surfaces, or `--images DIR` (class sub-folders; the last class in
alphabetical order, or `--new-class`, plays the new defect type).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import Settings
from cl_service.learning.settings import ModelConfig, UpdateSettings
from cl_service.v1 import inspection_pb2 as pb

Images = list[tuple[bytes, str]]  # (encoded image, true class)
OPERATOR = "demo-operator"


class DemoError(Exception):
    """The demo could not go on (a step failed or timed out); the message says which and why."""


@dataclass(frozen=True)
class DemoPlan:
    """How much of everything the demo streams, and how the service learns it."""

    day_one: int = 400  # known images on day one
    day_one_labeled: float = 0.6  # of those, labelled at the camera
    line: int = 100  # known images, unlabelled, once the first model is live
    unknown: int = 40  # images of the new type, unlabelled
    corrections: int = 10  # of the new type the operator labels from the review queue
    chute: int = 40  # labelled images of the new type from the reject chute
    fresh: int = 20  # new-type images checked after the update
    # When the gate rejects the update that learns the new type, the line goes on as a factory's would: this many
    # more labelled images (half known at the camera, half new from the reject chute), then the next update tries.
    # `attempts` updates at most.
    more_labels: int = 40
    attempts: int = 2
    side: int = 128  # camera image side (synthetic images)
    # classifier = "trained": batches of 16 (of each kind) and 80 steps keep an update near a minute and a half on
    # 2 cores (the default "lda" trains nothing)
    update: UpdateSettings = field(
        default_factory=lambda: UpdateSettings(model=ModelConfig(image_size=96), batch_size=16, min_steps=80, threads=2)
    )
    anomaly: dict[str, Any] = field(default_factory=lambda: {"error_sigma": 2.0, "patch": 8, "epochs": 2})
    false_alarm_rate: float = 0.02
    timeout_s: float = 600.0  # for any one step

    @classmethod
    def quick(cls) -> DemoPlan:
        """A shorter run (tests, a first look): fewer images, the same training settings; about 2 min on 2 cores."""
        return cls(
            day_one=300,
            day_one_labeled=0.7,
            line=60,
            unknown=30,
            chute=30,
        )


@dataclass
class Outcome:
    """What the run showed; `report_paths` maps each version to its HTML report."""

    data_dir: Path
    first_version: str = ""
    final_version: str = ""
    versions: list[str] = field(default_factory=list)
    known_classes: tuple[str, ...] = ()
    new_class: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # per version: accuracy, accuracy/<class>
    recall_before: float = 0.0  # new-type images that alerted before the update
    false_alarm_rate: float = 0.0  # known images that alerted
    alerts_raised: int = 0
    learned: float = 0.0  # fresh new-type images classified as the new class after the update
    recall_after: float = 0.0  # fresh new-type images still alerting after the update
    rejected: list[str] = field(default_factory=list)  # the gate's reasons for each candidate it rejected
    report_paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def first_accuracy(self) -> float:
        return self.metrics.get(self.first_version, {}).get("accuracy", 0.0)

    @property
    def final_accuracy(self) -> float:
        return self.metrics.get(self.final_version, {}).get("accuracy", 0.0)

    @property
    def final_per_class(self) -> dict[str, float]:
        figures = self.metrics.get(self.final_version, {})
        return {k.split("/", 1)[1]: v for k, v in figures.items() if k.startswith("accuracy/")}


class ImageSource:
    """Camera images of a set of classes: synthetic surfaces, or the files of a folder of class sub-folders."""

    def __init__(self, folder: Path | None = None, *, side: int = 128, new_class: str | None = None) -> None:
        self._side = side
        self._folder = None
        if folder is None:
            self.known: tuple[str, ...] = ("good", "crack")
            self.new = new_class or "pit"
            return
        from cl_service.simulate.folder import FolderSource

        self._folder = FolderSource(folder, seed=0)
        classes = self._folder.classes
        if len(classes) < 3:
            raise DemoError(
                f"{folder} has {len(classes)} class folder(s) ({', '.join(classes)}); the demo needs at least "
                "three: two or more known classes and one that appears later as the new defect type"
            )
        self.new = new_class or classes[-1]
        if self.new not in classes:
            raise DemoError(f"--new-class {self.new!r} is not one of the class folders: {', '.join(classes)}")
        self.known = tuple(c for c in classes if c != self.new)
        self._files: dict[str, list[Any]] = {c: [] for c in classes}
        for item in self._folder.items("shuffled"):
            self._files[item.label].append(item)
        self._used = dict.fromkeys(classes, 0)

    def take(self, classes: Sequence[str], count: int, seed: int) -> Images:
        """`count` images spread over `classes` (folder images are each used once, in a fixed order)."""
        if self._folder is None:
            from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image

            config = SurfaceConfig(width=self._side, height=self._side, classes=tuple(classes), seed=seed)
            return [(encode_image(i.pixels), i.label) for i in SurfaceGenerator(config).stream(0, count)]
        out: Images = []
        for k in range(count):
            name = classes[k % len(classes)]
            files = self._files[name]
            if self._used[name] >= len(files):
                continue  # this class has no images left: the others go on
            item = files[self._used[name]]
            self._used[name] += 1
            out.append((self._folder.read(item), name))
        return out


class View:
    """The live terminal view: the steps so far, the current one with its progress, and the service's state."""

    STEPS = (
        "day one: known parts stream in",
        "first model (cold start)",
        "a new defect type appears",
        "operator reviews and labels",
        "update: learn the new type",
        "check: the new type is learned",
    )

    def __init__(self, console: Console) -> None:
        self.console = console
        self.step = -1
        self.state: dict[str, str] = {"live model": "none yet", "open alerts": "0"}
        self.progress = Progress(
            TextColumn("  [bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> View:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self._render(), refresh=True)
        self._live.__exit__(None, None, None)
        if not self.console.is_terminal:  # the final frame ends without a line break there
            self.console.line()

    def begin(self, step: int) -> None:
        """Start step `step` (0-based); len(STEPS) marks every step done."""
        self.step = step
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        if step < len(self.STEPS):
            self.say(f"[bold cyan]{step + 1}/{len(self.STEPS)}[/] {self.STEPS[step]}")
        self.refresh()

    def work(self, description: str, total: int | None, done: int = 0, detail: str = "") -> None:
        if self._task is None:
            self._task = self.progress.add_task(description, total=total, completed=done, detail=detail)
        else:
            self.progress.update(self._task, description=description, total=total, completed=done, detail=detail)
        self.refresh()

    def set(self, **values: str) -> None:
        self.state.update({k.replace("_", " "): v for k, v in values.items()})
        self.refresh()

    def say(self, message: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")

    def refresh(self) -> None:
        self._live.update(self._render())

    def _render(self) -> Group:
        steps = Table.grid(padding=(0, 1))
        for i, name in enumerate(self.STEPS):
            mark = "[green]✓[/]" if i < self.step else ("[yellow]▶[/]" if i == self.step else "[dim]·[/]")
            steps.add_row(mark, name if i <= self.step else f"[dim]{name}[/]")
        state = Table.grid(padding=(0, 2))
        for key, value in self.state.items():
            state.add_row(f"[bold]{key}[/]", value)
        layout = Table.grid(padding=(0, 4))
        layout.add_row(steps, state)
        return Group(layout, self.progress)


def run_demo(
    settings: Settings,
    plan: DemoPlan | None = None,
    *,
    images: Path | None = None,
    new_class: str | None = None,
    console: Console | None = None,
) -> Outcome:
    """Run the whole loop once on a fresh server in this process; raises DemoError when a step fails."""
    from cl_service.api.server import server_in_thread
    from cl_service.reports import write_version_report

    plan = plan or DemoPlan()
    console = console or Console()
    source = ImageSource(images, side=plan.side, new_class=new_class)
    settings = settings.model_copy(
        update={
            "bind": "127.0.0.1:0",
            "scheduler": True,
            "inspect": True,
            "update_after_labels": 0,  # the operator asks for each update (the nightly cron stays as configured)
            "update_after_alerts": 0,
            "model_poll_s": 0.5,
            "inspect_poll_s": 0.3,
            "update_check_s": 1.0,
            "shutdown_grace_s": 2.0,
            "anomaly": plan.anomaly,
            "anomaly_false_alarm_rate": plan.false_alarm_rate,
            "update": plan.update,
        }
    )
    outcome = Outcome(data_dir=settings.data_dir.resolve(), known_classes=source.known, new_class=source.new)
    started = time.monotonic()
    with server_in_thread(settings) as running, View(console) as view:
        target = f"127.0.0.1:{running.port}"
        view.set(service=f"{target}, store in {outcome.data_dir}", classes=", ".join(source.known))
        with Client(target, timeout_s=plan.timeout_s) as client:
            _Story(client, target, source, plan, view, outcome).run()
        # each update wrote its version's report; written again now, they hold the alerts and scores since
        view.work("reports", len(outcome.versions))
        repository = running.core.live.repository
        for done, version in enumerate(outcome.versions, 1):
            outcome.report_paths[version] = write_version_report(running.core.store, repository, version).resolve()
            view.work("reports", len(outcome.versions), done)
    outcome.seconds = time.monotonic() - started
    return outcome


@dataclass
class _Story:
    client: Client
    target: str
    source: ImageSource
    plan: DemoPlan
    view: View
    outcome: Outcome
    truth: dict[int, str] = field(default_factory=dict)

    def run(self) -> None:
        plan, source, view, outcome = self.plan, self.source, self.view, self.outcome
        view.begin(0)
        day_one = source.take(source.known, plan.day_one, seed=1)
        labeled = max(1, round(plan.day_one_labeled * len(day_one)))
        self._stream("cam-1", day_one[:labeled], labeled=True, what="labelled at the camera")
        self._stream("cam-1", day_one[labeled:], labeled=False, what="unlabelled")

        view.begin(1)
        outcome.first_version = self._update("the first model, from the camera labels")
        first = outcome.first_version

        view.begin(2)
        known_ids = self._stream("cam-1", source.take(source.known, plan.line, seed=2), labeled=False, what="known")
        new_ids = self._stream("cam-1", source.take((source.new,), plan.unknown, seed=3), labeled=False, what="new")
        scored = self._wait_scored(known_ids + new_ids, first)
        known_alarms = sum(scored[i].anomalous for i in known_ids)
        new_alarms = sum(scored[i].anomalous for i in new_ids)
        outcome.false_alarm_rate = known_alarms / max(1, len(known_ids))
        outcome.recall_before = new_alarms / max(1, len(new_ids))
        status = self.client.status()
        outcome.alerts_raised = int(status.open_alerts)
        view.set(
            open_alerts=str(status.open_alerts),
            alert_recall=f"{outcome.recall_before:.0%} of {source.new} images alerted "
            f"(false alarms {outcome.false_alarm_rate:.0%} of known)",
        )
        view.say(
            f"{new_alarms} of {len(new_ids)} {source.new} images raised alerts; {known_alarms} of {len(known_ids)} "
            "known images did"
        )

        view.begin(3)
        self._review(new_ids)
        self._stream("cam-2", source.take((source.new,), plan.chute, seed=4), labeled=True, what="reject chute")

        view.begin(4)
        outcome.final_version = final = self._learn_new_type()

        view.begin(5)
        self._wait_anomaly_model(final)
        fresh = source.take((source.new,), plan.fresh, seed=5)
        predicted = [self.client.classify(data).class_name for data, _ in fresh]
        outcome.learned = predicted.count(source.new) / max(1, len(fresh))
        later = self._stream("cam-1", fresh, labeled=False, what=f"fresh {source.new}")
        rescored = self._wait_scored(later, final)
        outcome.recall_after = sum(rescored[i].anomalous for i in later) / max(1, len(later))
        view.set(
            new_type=f"{outcome.learned:.0%} of fresh {source.new} images classified as {source.new}; "
            f"{outcome.recall_after:.0%} still alert (before: {outcome.recall_before:.0%})"
        )
        view.begin(len(View.STEPS))

    def _stream(self, camera: str, images: Images, *, labeled: bool, what: str) -> list[int]:
        client = CameraClient(self.target, camera)
        items = [CameraImage(data, label=label if labeled else "") for data, label in images]
        ids: list[int] = []
        self.view.work(f"ingest {what}", len(items))
        for result in client.stream(items):
            if not result.durable:
                raise DemoError(f"an image was not stored: {result.error_reason}: {result.error_message}")
            ids.append(result.sample_id)
            if len(ids) % 10 == 0 or len(ids) == len(items):
                self.view.work(f"ingest {what}", len(items), len(ids))
        self.truth.update({i: label for i, (_, label) in zip(ids, images, strict=True)})
        return ids

    def _learn_new_type(self) -> str:
        """Updates until one passes the gate (at most `plan.attempts`); more labelled images arrive between."""
        plan, source = self.plan, self.source
        for attempt in range(1, max(1, plan.attempts) + 1):
            version = self._update(f"learn {source.new}", may_be_rejected=attempt < plan.attempts)
            if version:
                return version
            known = source.take(source.known, plan.more_labels // 2, seed=10 + attempt)
            self._stream("cam-1", known, labeled=True, what="labelled at the camera")
            chute = source.take((source.new,), plan.more_labels - len(known), seed=20 + attempt)
            self._stream("cam-2", chute, labeled=True, what="reject chute")
        raise AssertionError("unreachable: the last attempt raises on rejection")

    def _update(self, why: str, *, may_be_rejected: bool = False) -> str:
        """Trigger an update and follow it; the version that went live, or "" when the gate rejected the candidate
        and `may_be_rejected`."""
        view = self.view
        run = self.client.trigger_update(OPERATOR, why)
        view.say(f"update run {run.run_id} queued by the scheduler: {why}")
        last = pb.UpdateProgress()
        for last in self.client.watch_update(run.run_id, timeout_s=self.plan.timeout_s):
            detail = f"loss {last.loss:.3f}" if last.loss else ""
            if last.eta_seconds:
                detail += f"  eta {last.eta_seconds:.0f} s"
            view.work(f"update: {last.stage or 'queued'}", last.total_steps or None, last.step, detail)
            view.set(update=f"run {run.run_id}: {last.stage or 'queued'}")
        if last.state == pb.UPDATE_STATE_REJECTED:
            self.outcome.rejected.append(last.message)
            if may_be_rejected:
                view.say(
                    f"update run {run.run_id}: the gate rejected the candidate, the live model stays: {last.message}; "
                    "the line goes on, and the next update learns from more labels"
                )
                return ""
        if last.state != pb.UPDATE_STATE_SUCCEEDED:
            state = pb.UpdateState.Name(last.state)
            raise DemoError(f"update run {run.run_id} ended {state}: {last.message}")
        models = self.client.list_models(include_rejected=True).models
        version = max((m.version for m in models if m.state == pb.MODEL_STATE_ACCEPTED), default="")
        self.outcome.versions = sorted(m.version for m in models)
        view.work("hot swap: waiting for the server to serve it", None, 0)
        self._wait(lambda: self.client.status().live_model_version == version, f"{version} going live")
        self._wait_anomaly_model(version)
        model = next(m for m in self.client.list_models().models if m.version == version)
        self.outcome.metrics[version] = dict(model.metrics)
        accuracy = model.metrics.get("accuracy", 0.0)
        view.set(
            live_model=f"{version} ({self.client.status().live_engine}), validation accuracy {accuracy:.1%}",
            classes=", ".join(model.classes),
        )
        report = self.outcome.data_dir / "models" / version / "report.html"
        view.say(f"update run {run.run_id} succeeded: {version} passed the gate and is live; its report: {report}")
        return version

    def _wait_scored(self, ids: Sequence[int], version: str) -> dict[int, pb.Prediction]:
        """The inspector's prediction of each sample under `version` (it scores in the background)."""
        scored: dict[int, pb.Prediction] = {}
        deadline = time.monotonic() + self.plan.timeout_s
        while True:
            for sample_id in ids:
                if sample_id not in scored:
                    sample = self.client.get_sample(sample_id)
                    if sample.HasField("prediction") and sample.prediction.model_version == version:
                        scored[sample_id] = sample.prediction
            self.view.work("inspector scoring", len(ids), len(scored))
            if len(scored) == len(ids):
                return scored
            if time.monotonic() > deadline:
                raise DemoError(f"the inspector scored {len(scored)} of {len(ids)} images in {self.plan.timeout_s} s")
            time.sleep(0.5)

    def _review(self, new_ids: Sequence[int]) -> None:
        """The operator works the review queue's anomalous images: labels those of the new type (naming a new
        class) and acknowledges the alerts."""
        view, source = self.view, self.source
        wanted = self.plan.corrections
        chosen: list[int] = []
        token = ""
        while len(chosen) < wanted:
            page = self.client.review_queue(page_size=50, page_token=token, reason=pb.REVIEW_REASON_ANOMALOUS)
            chosen += [i.sample.sample_id for i in page.items if self.truth.get(i.sample.sample_id) == source.new]
            token = page.next_page_token
            if not token:
                break
        if len(chosen) < wanted:  # the queue ran dry: the operator looks through the line's images
            chosen += [i for i in new_ids if i not in chosen]
        chosen = chosen[:wanted]
        corrections = [pb.Correction(sample_id=i, class_name=source.new, new_class=True) for i in chosen]
        results = self.client.submit_corrections(OPERATOR, corrections)
        refused = [r.error.message for r in results if not r.accepted]
        if refused:
            raise DemoError(f"corrections were refused: {refused[0]}")
        for event in self._open_alerts():
            self.client.acknowledge_alert(event.alert.alert_id, OPERATOR, f"new defect type: {source.new}")
        view.say(
            f"the operator labelled {len(chosen)} images as a new class '{source.new}' and acknowledged the alerts"
        )
        view.set(open_alerts=str(self.client.status().open_alerts))

    def _open_alerts(self) -> Iterator[pb.AlertEvent]:
        opened = self.client.status().open_alerts
        if not opened:
            return
        seen = 0
        for event in self.client.watch_alerts(timeout_s=30):
            if event.alert.state == pb.ALERT_STATE_OPEN:
                yield event
                seen += 1
            if seen >= opened:
                return

    def _wait_anomaly_model(self, version: str) -> None:
        folder = self.outcome.data_dir / "models" / version / "anomaly"
        self._wait(folder.is_dir, f"the anomaly model of {version}")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.plan.timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise DemoError(f"{what} did not happen within {self.plan.timeout_s:.0f} s")
            time.sleep(0.3)


def summary(outcome: Outcome) -> str:
    """What the run showed, as plain text lines."""
    lines = [
        f"done in {outcome.seconds:.0f} s: {outcome.first_version} (first model, validation accuracy "
        f"{outcome.first_accuracy:.1%}) -> {outcome.final_version} (validation accuracy {outcome.final_accuracy:.1%})",
        f"new defect type '{outcome.new_class}': {outcome.recall_before:.0%} of its images alerted before it was "
        f"learned (known images: {outcome.false_alarm_rate:.0%} false alarms); after the update "
        f"{outcome.learned:.0%} are classified as it and {outcome.recall_after:.0%} still alert",
        *(f"rejected by the gate (the live model stayed): {reason}" for reason in outcome.rejected),
        "per class (validation): "
        + ", ".join(f"{name} {value:.0%}" for name, value in sorted(outcome.final_per_class.items())),
        f"data folder: {outcome.data_dir} (store.sqlite, blobs/, models/)",
    ]
    lines += [f"report of {v}: {p}" for v, p in sorted(outcome.report_paths.items())]
    return "\n".join(lines)


def quiet_console() -> Console:
    """A console that keeps what it printed (tests, logs)."""
    return Console(file=io.StringIO(), width=120, force_terminal=False)


__all__ = ["DemoError", "DemoPlan", "ImageSource", "Outcome", "quiet_console", "run_demo", "summary"]
