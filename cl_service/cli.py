"""The `cl-service` command: serve, demo, simulate, status, models, migrate, update, eval-stream, check-store.

Settings come from one place (cl_service.config.load_settings): flags here override environment
variables (CL_SERVICE_*), which override the TOML file given with --config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cl_service import __version__
from cl_service.config import Settings, load_settings


def _settings_flags(parser: argparse.ArgumentParser, *, store: bool = True, again: bool = False) -> None:
    """--config and --log-level; with `store`, also where the store is (a command that keeps its own has no say).
    `again`: the flags of a sub-command's own sub-commands, so that they may come after it too (they set nothing
    when not given, leaving what the sub-command's flags set)."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if again else {}
    parser.add_argument("--config", type=Path, help="a TOML file of settings", **unset)
    if store:
        parser.add_argument("--data-dir", type=Path, help="folder of the embedded store (default ./cl-data)", **unset)
        parser.add_argument(
            "--database-url", help="SQLAlchemy URL of the metadata store (default: SQLite in data dir)", **unset
        )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...", **unset)


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    store = {"data_dir": getattr(args, "data_dir", None), "database_url": getattr(args, "database_url", None)}
    return load_settings(args.config, log_level=args.log_level, **store, **extra)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: plaintext, TLS (--ca) or mutual TLS (--ca, --cert, --key); a token."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="the server's host:port")
    parser.add_argument("--ca", type=Path, help="TLS: the CA certificate (PEM) that signed the server's")
    parser.add_argument("--cert", type=Path, help="mutual TLS: this client's certificate chain (PEM)")
    parser.add_argument("--key", type=Path, help="mutual TLS: this client's private key (PEM)")
    parser.add_argument(
        "--token", help="API token (default: the CL_SERVICE_TOKEN variable; prefer it, a flag shows in process lists)"
    )


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """`token` and `tls` for Client and CameraClient from the _client_flags."""
    from cl_service.client import Tls

    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together (mutual TLS)")
    if args.cert is not None and args.ca is None:
        raise ValueError("--cert and --key need --ca: the CA that signed the server's certificate")
    return {"token": args.token, "tls": Tls.from_files(args.ca, args.cert, args.key) if args.ca else None}


def _simulation_flags(parser: argparse.ArgumentParser, *, count: int, cameras: int) -> None:
    parser.add_argument("--cameras", type=int, default=cameras, help="concurrent camera streams")
    parser.add_argument("--count", type=int, default=count, help="images per camera")
    parser.add_argument("--rate", type=float, default=0.0, help="images/s per camera (0: as fast as possible)")
    parser.add_argument("--labeled-fraction", type=float, default=0.1, help="share of images sent with a label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-id", default="", help="request-id prefix; reuse one to resend the same images")
    parser.add_argument("--images", type=Path, help="a folder with one sub-folder per class, instead of synthetic")
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "bmp", "tiff", "webp"])
    parser.add_argument("--size", type=int, default=224, help="synthetic image width and height")
    parser.add_argument("--noise", type=float, default=0.03, help="synthetic pixel noise (0..1)")
    parser.add_argument("--lighting-drift", type=float, default=0.0, help="synthetic slow brightness drift (0..1)")
    parser.add_argument("--new-defect", default="crack", help="a defect type that starts appearing ('' for none)")
    parser.add_argument("--new-defect-after", type=int, default=-1, help="index from which it appears (-1: half)")


def _simulation_config(args: argparse.Namespace, target: str) -> Any:
    from cl_service.simulate.driver import SimulationConfig
    from cl_service.simulate.surface import SurfaceConfig

    after = args.new_defect_after if args.new_defect_after >= 0 else args.count // 2
    surface = SurfaceConfig(
        width=args.size,
        height=args.size,
        noise=args.noise,
        lighting_drift=args.lighting_drift,
        new_defect=args.new_defect or None,
        new_defect_after=after,
        seed=args.seed,
    )
    return SimulationConfig(
        target=target,
        cameras=args.cameras,
        count=args.count,
        rate=args.rate,
        labeled_fraction=args.labeled_fraction,
        seed=args.seed,
        images=args.images,
        surface=surface,
        image_format=args.format,
        run_id=args.run_id or f"run{time.strftime('%Y%m%d%H%M%S')}",
        **_connection(args),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cl-service", description="Continual learning service for visual inspection")
    parser.add_argument("--version", action="version", version=f"cl-service {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server until SIGINT/SIGTERM")
    _settings_flags(serve)
    serve.add_argument("--bind", help="host:port to listen on (default 127.0.0.1:50051, loopback only)")

    demo = commands.add_parser(
        "demo", help="the whole loop on embedded defaults: cameras, first model, a new defect, alerts, update, swap"
    )
    _settings_flags(demo)
    demo.add_argument("--images", type=Path, help="a folder with one sub-folder per class, instead of synthetic")
    demo.add_argument("--new-class", help="with --images: the class that appears later (default: the last one)")
    demo.add_argument(
        "--quick", action="store_true", help="fewer images, the same training settings (about 2 min on 2 cores)"
    )

    report = commands.add_parser("report", help="write a model version's HTML report (default: the live version)")
    _settings_flags(report)
    report.add_argument("version", nargs="?", help="e.g. v0002 (default: the live version)")
    report.add_argument("--out", type=Path, help="the HTML file to write (default: in the version's folder)")

    simulate = commands.add_parser("simulate", help="stream simulated camera images to a running server")
    _client_flags(simulate)
    _simulation_flags(simulate, count=1000, cameras=1)

    status = commands.add_parser("status", help="print a running server's status")
    _client_flags(status)

    models = commands.add_parser("models", help="list a running server's model versions, or make one live")
    _client_flags(models)
    models.add_argument("--all", action="store_true", help="also list versions the validation gate rejected")
    models.add_argument("--activate", metavar="VERSION", help="promote or roll back to this kept version")
    models.add_argument("--by", help="who asks, for the audit trail (default: your user name)")
    models.add_argument("--reason", default="", help="why, for the audit trail")

    migrate = commands.add_parser("migrate", help="bring the store's schema to this version")
    _settings_flags(migrate)

    token = commands.add_parser("token", help="create, list or revoke API tokens (store access needed)")
    _settings_flags(token)
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="a new token; its secret is printed once")
    create.add_argument("name", help="a unique name, e.g. camera-line-3 or olga")
    create.add_argument("--role", required=True, choices=("camera", "operator", "admin"))
    create.add_argument("--by", help="who creates it, for the record (default: your user name)")
    listing = token_commands.add_parser("list", help="every token: name, role, created, revoked")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name (takes effect within auth_cache_s)")
    revoke.add_argument("name")
    for sub in (create, listing, revoke):
        _settings_flags(sub, again=True)  # `token create NAME --data-dir DIR` as well as `token --data-dir DIR ...`

    update = commands.add_parser("update", help="run one incremental update now (teacher, replay + EWC, gate)")
    _settings_flags(update)
    update.add_argument("--epochs", type=int, help="passes over the update's new data (default 4)")
    update.add_argument("--seed", type=int, help="seed of sampling, augmentation and initialisation (default 0)")

    worker = commands.add_parser("run-update", help=argparse.SUPPRESS)  # started by the scheduler
    worker.add_argument("--run-id", type=int, required=True)
    worker.add_argument("--owner", required=True)
    worker.add_argument("--settings-json", type=Path, required=True)

    evaluate = commands.add_parser(
        "eval-stream",
        help="replay a folder of class sub-folders as a class-incremental camera stream through ingest and updates",
    )
    _settings_flags(evaluate, store=False)  # it keeps its own SQLite store under --out
    evaluate.add_argument("folder", type=Path, help="a folder with one sub-folder of images per class")
    evaluate.add_argument("--steps", default="3,2,2", help="classes per step, comma-separated (sum: all classes)")
    evaluate.add_argument("--labeled-fraction", type=float, default=1.0, help="share of each class sent labeled")
    evaluate.add_argument(
        "--labels-only", action="store_true", help="also run the same loop without the unlabeled images"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the train/test split and the labeled share")
    evaluate.add_argument("--order-seed", type=int, default=1, help="seed of the class order")
    evaluate.add_argument("--classes", default="", help="only these classes, comma-separated")
    evaluate.add_argument(
        "--references",
        default="naive,cumulative,joint",
        help="reference strategies: naive, cumulative, joint, replay, der (Avalanche; needs the bench extra), "
        "or 'none'",
    )
    evaluate.add_argument("--reference-memory", type=int, default=200, help="Avalanche Replay/DER memory size")
    evaluate.add_argument("--epochs", type=int, help="passes per update (default: the [update] settings)")
    evaluate.add_argument("--image-size", type=int, help="model input size (default: the [update] settings)")
    evaluate.add_argument("--replay-per-class", type=int, default=10, help="replay budget: exemplars per class")
    evaluate.add_argument("--out", type=Path, default=Path("stream-eval"), help="folder for results and data")

    check = commands.add_parser("check-store", help="check the database and that every blob is readable")
    _settings_flags(check)
    check.add_argument("--verify-bytes", action="store_true", help="also re-hash every blob")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import grpc

    args = build_parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args) or 0)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"cl-service {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # a call to a server failed: its status, not a traceback
        code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"cl-service {args.command}: {args.target} answered {code}: {details}", file=sys.stderr)
        return 1


def _logging(settings: Settings) -> None:
    from cl_service.logs import configure

    configure(settings.log_level, settings.log_format)


def cmd_serve(args: argparse.Namespace) -> int:
    from cl_service.api.server import serve_forever

    settings = _settings(args, bind=args.bind)
    _logging(settings)
    asyncio.run(serve_forever(settings))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cl_service.simulate.driver import run_simulation

    config = _simulation_config(args, args.target)
    summary = _with_progress(config, run_simulation)
    return 0 if not summary.failures else 1


def cmd_status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    from cl_service.client import Client

    with Client(args.target, timeout_s=10, **_connection(args)) as client:
        print(MessageToJson(client.status(), preserving_proto_field_name=True))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import grpc

    from cl_service.client import Client
    from cl_service.v1 import inspection_pb2 as pb

    with Client(args.target, timeout_s=600, **_connection(args)) as client:
        if args.activate:
            try:
                client.activate_model(args.activate, requested_by=args.by or _user(), reason=args.reason)
            except grpc.RpcError as exc:
                print(f"cl-service models: {exc.details()}", file=sys.stderr)
                return 1
        reply = client.list_models(include_rejected=args.all)
    print(f"{'version':<8} {'parent':<8} {'state':<9} {'accuracy':>8} {'macro-F1':>8}  engines       classes")
    for model in reply.models:
        accuracy, f1 = (f"{model.metrics[k]:.1%}" if k in model.metrics else "-" for k in ("accuracy", "macro_f1"))
        mark = " *" if model.live else ""
        state = pb.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower()
        print(
            f"{model.version:<8} {model.parent_version or '-':<8} {state:<9} {accuracy:>8} "
            f"{f1:>8}  {','.join(model.engines) or '-':<13} {','.join(model.classes)}{mark}"
        )
    print(f"live: {reply.live_version or 'none'}")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        return "cli"


def cmd_migrate(args: argparse.Namespace) -> int:
    from replay_store.db import create_store_engine, current_revision, migrate

    settings = _settings(args)
    engine = create_store_engine(settings.resolved_database_url)
    migrate(engine)
    print(f"store schema at revision {current_revision(engine)}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from replay_store.store import Store
    from replay_store.tokens import create_token, list_tokens, revoke_token

    settings = _settings(args)
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    try:
        if args.token_command == "create":
            try:
                row, secret = create_token(store, args.name, args.role, args.by or _user())
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"token {row.name} ({row.role}) created; its secret, shown only now:\n{secret}")
        elif args.token_command == "list":
            for row in list_tokens(store):
                revoked = f"revoked {row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "active"
                print(f"{row.name}\t{row.role}\tcreated {row.created_at:%Y-%m-%d %H:%M} by {row.created_by}\t{revoked}")
        else:
            try:
                row = revoke_token(store, args.name)
            except KeyError as exc:
                print(f"error: {exc.args[0]}", file=sys.stderr)
                return 2
            print(f"token {row.name} revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    finally:
        store.close()
    return 0


@contextlib.contextmanager
def _update_lease(store: Any, ttl_s: float) -> Iterator[bool]:
    """Hold the update lease (the one the servers' schedulers take) while the block runs, renewing it; yields False,
    holding nothing, when another process holds it: one update at a time, whoever starts it."""
    from replay_store import runs

    owner = f"cli:{socket.gethostname()}:{os.getpid()}"
    if not runs.acquire_lease(store, owner, ttl_s):
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 4):
            with contextlib.suppress(Exception):
                runs.renew(store, owner, ttl_s, run_id=0)

    renewer = threading.Thread(target=renew, name="update-lease", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        runs.release_lease(store, owner)


def cmd_update(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cl_service.learning.repository import ModelRepository
    from cl_service.learning.settings import UpdateSettings
    from cl_service.learning.update import UpdateSkippedError
    from cl_service.update_job import update_and_publish
    from replay_store.store import Store

    settings = _settings(args)
    _logging(settings)
    overrides = {key: value for key in ("epochs", "seed") if (value := getattr(args, key)) is not None}
    update_settings = UpdateSettings.model_validate({**settings.update.model_dump(), **overrides})
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    try:
        repository = ModelRepository(settings.data_dir / "models", store)
        columns = (TextColumn("{task.description:<9}"), BarColumn(), TextColumn("{task.fields[note]}"))
        with _update_lease(store, settings.update_lease_s) as held, Progress(*columns, TimeRemainingColumn()) as bars:
            if not held:
                bars.stop()
                print(
                    "error: another update is running (a server's scheduler holds the update lease); run this when "
                    "it has ended, or queue one with TriggerUpdate",
                    file=sys.stderr,
                )
                return 2
            tasks: dict[str, Any] = {}

            def progress(stage: str, step: int, total: int, values: dict[str, float]) -> None:
                if stage not in tasks:
                    tasks[stage] = bars.add_task(stage, total=max(total, 1), note="")
                note = "  ".join(f"{k} {v:.3f}" for k, v in values.items())
                bars.update(tasks[stage], completed=step, total=max(total, 1), note=note)

            updated = update_and_publish(settings, store, repository, update_settings, progress)
    except UpdateSkippedError as exc:
        print(f"no update: {exc}")
        return 0
    finally:
        store.close()
    result = updated.result
    verdict = "accepted, now live" if result.accepted else "rejected; the live model stays"
    print(f"{result.version} (parent {result.parent or 'none'}): {verdict}")
    for reason in result.reasons:
        print(f"  {reason}")
    if result.candidate is not None:
        print(f"  validation accuracy {result.candidate.accuracy:.1%}, macro-F1 {result.candidate.macro_f1:.1%}")
    print("  " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    if updated.engine_note:
        print(f"  {updated.engine_note}")
    if updated.anomaly_note:
        print(f"  anomaly model: {updated.anomaly_note}")
    if updated.pruned:
        print(f"  retention removed {', '.join(updated.pruned)} (keep_versions {settings.keep_versions})")
    return 0 if result.accepted else 1


def cmd_run_update(args: argparse.Namespace) -> int:
    import faulthandler

    from cl_service.update_job import run_job

    faulthandler.enable()  # a crash in native code (torch, faiss) leaves its Python stack in the run's reason
    with contextlib.suppress(OSError):
        os.nice(10)  # training yields the CPU to serving. Set here, not in a preexec_fn: Python code run between
        # fork and exec in the multi-threaded server (gRPC's threads) crashed the child now and then (SIGSEGV)

    settings = Settings.model_validate_json(args.settings_json.read_text())
    args.settings_json.unlink(missing_ok=True)  # it holds the database URL; nothing reads it again
    _logging(settings)
    return run_job(settings, args.run_id, args.owner)


def cmd_eval_stream(args: argparse.Namespace) -> int:
    from cl_service.evaluation.references import Recipe
    from cl_service.evaluation.runner import StreamSpec, evaluate_stream, load_stream, write_outputs
    from cl_service.evaluation.stream import StreamPlan
    from cl_service.learning.settings import UpdateSettings

    settings = _settings(args)
    _logging(settings)
    try:
        sizes = tuple(int(part) for part in args.steps.split(","))
    except ValueError:
        raise ValueError(f"--steps takes comma-separated class counts such as 3,2,2, not {args.steps!r}") from None
    classes = tuple(c for c in args.classes.split(",") if c) or None
    references = [] if args.references == "none" else [r for r in args.references.split(",") if r]
    spec = StreamSpec(args.folder, sizes, split_seed=args.seed, order_seed=args.order_seed, classes=classes)
    chosen = settings.update.model_dump()
    chosen["seed"] = args.seed
    if args.epochs:
        chosen["epochs"] = args.epochs
    if args.image_size:
        chosen["model"]["image_size"] = args.image_size
    stream = load_stream(spec, UpdateSettings.model_validate(chosen))
    chosen["replay_budget"] = args.replay_per_class * len(stream.split.classes)
    update = UpdateSettings.model_validate(chosen)
    plans = [("ours", StreamPlan(args.labeled_fraction, seed=args.seed))]
    if args.labels_only:
        plans.append(("ours_labels_only", StreamPlan(args.labeled_fraction, send_unlabeled=False, seed=args.seed)))
    recipe = Recipe(
        image_size=update.model.image_size, epochs=update.epochs, mem_size=args.reference_memory, seed=args.seed
    )
    print(f"steps: {' | '.join(', '.join(step) for step in stream.steps)}", flush=True)
    evaluation = evaluate_stream(
        stream,
        spec,
        settings=update,
        plans=plans,
        references=references,
        recipe=recipe,
        work_dir=args.out / "data",
        say=lambda line: print(line, flush=True),
    )
    paths = write_outputs(evaluation, args.out)
    print(paths[1].read_text())
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def cmd_check_store(args: argparse.Namespace) -> int:
    from replay_store.store import Store

    settings = _settings(args)
    store = Store.open(settings.resolved_database_url, settings.blob_dir, migrate_schema=False)
    try:
        problems = store.integrity_problems(verify_bytes=args.verify_bytes)
        counts = store.counts()
    finally:
        store.close()
    for problem in problems:
        print(problem)
    print(f"{counts.samples} samples, {counts.blobs} blobs: {'OK' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the whole loop on a fresh server in this process, with a live terminal view."""
    from rich.console import Console

    from cl_service.demo import DemoError, DemoPlan, run_demo, summary

    settings = _settings(args)
    logging.basicConfig(level="WARNING")
    console = Console()
    if settings.data_dir.exists() and any(settings.data_dir.iterdir()):
        console.print(
            f"[red]{settings.data_dir.resolve()} is not empty[/]: the demo starts from a fresh store; "
            "remove it or pass --data-dir with a new folder"
        )
        return 2
    console.print(f"[bold]cl-service {__version__}[/]: the loop, end to end, in {settings.data_dir.resolve()}")
    plan = DemoPlan.quick() if args.quick else DemoPlan()
    try:
        outcome = run_demo(settings, plan, images=args.images, new_class=args.new_class, console=console)
    except DemoError as exc:
        console.print(f"[red]the demo stopped: {exc}[/]")
        return 1
    console.print(summary(outcome))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cl_service.learning.repository import ModelRepository
    from cl_service.reports import ReportError, report_command
    from replay_store.store import Store

    settings = _settings(args)
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    try:
        path = report_command(store, ModelRepository(settings.data_dir / "models", store), args.version, args.out)
    except ReportError as exc:
        print(f"cl-service report: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(path)
    return 0


def _with_progress(config: Any, run: Any, console: Any = None) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console()
    total = config.count * config.cameras if config.images is None else None
    counts = {"stored": 0, "already_stored": 0, "rejected": 0}
    lock = threading.Lock()
    with Progress(
        TextColumn("[bold]ingest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("ingest", total=total, detail="")

        def on_result(_camera: int, result: Any) -> None:
            with lock:
                counts[result.status] = counts.get(result.status, 0) + 1
                detail = f"stored {counts['stored']}  dup {counts['already_stored']}  rejected {counts['rejected']}"
            progress.update(task, advance=1, detail=detail)

        summary = run(config, on_result)
    rate = summary.sent / summary.seconds if summary.seconds else 0.0
    console.print(
        f"{summary.sent} images from {config.cameras} camera(s) in {summary.seconds:.1f} s ({rate:.0f}/s): "
        f"{summary.stored} durable, {summary.statuses['rejected']} rejected, {summary.reconnects} reconnects"
    )
    for failure in summary.failures:
        console.print(f"[red]{failure}[/]")
    return summary


_COMMANDS = {
    "serve": cmd_serve,
    "eval-stream": cmd_eval_stream,
    "demo": cmd_demo,
    "report": cmd_report,
    "simulate": cmd_simulate,
    "status": cmd_status,
    "models": cmd_models,
    "migrate": cmd_migrate,
    "token": cmd_token,
    "check-store": cmd_check_store,
    "update": cmd_update,
    "run-update": cmd_run_update,
}
