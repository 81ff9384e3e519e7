"""One Settings object, built once at start-up from (highest first) CLI flags, environment variables
(`CL_SERVICE_*`), a TOML file, and the defaults below; then passed down. Nothing reads the environment
anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from cl_service.learning.settings import UpdateSettings
from replay_store.naming import class_name_problem

MIB = 1 << 20


class Settings(BaseSettings):
    """Every knob of the service. See README "Configuration"."""

    model_config = SettingsConfigDict(
        env_prefix="CL_SERVICE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(Path("cl-data"), description="Folder of the embedded store (SQLite file and blob segments).")
    database_url: str = Field("", description="SQLAlchemy URL of the metadata store; empty: SQLite in data_dir.")
    bind: str = Field("127.0.0.1:50051", description="host:port the gRPC server listens on (loopback by default).")
    auth: bool = Field(
        False,
        description="Require a bearer token with a role on every call (cl-service token create); off: loopback only.",
    )
    metrics_bind: str = Field(
        "", description="host:port of the Prometheus /metrics endpoint (no authentication); empty: off."
    )
    auth_cache_s: float = Field(5.0, ge=0, description="Seconds a looked-up token is remembered (revocation delay).")
    tls_cert: Path | None = Field(None, description="PEM certificate chain of the server: serve TLS (with tls_key).")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mutual TLS; needs tls_cert)."
    )
    max_image_bytes: int = Field(16 * MIB, gt=0, description="Largest encoded image accepted, in bytes.")
    camera_max_images_per_s: float = Field(
        0.0, ge=0, description="Per-camera Ingest rate; a faster camera is slowed down (bursts of 2 s). 0: no limit."
    )
    min_free_disk_bytes: int = Field(
        1024 * MIB,
        ge=0,
        description="Refuse new images while the store's disk has less free space than this (0: no guard).",
    )
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest image accepted, in pixels (bomb guard).")
    max_message_bytes: int = Field(
        0, ge=0, description="gRPC transport limit per message; 0: twice max_image_bytes plus 1 MiB."
    )
    stream_max_in_flight: int = Field(
        256, ge=1, le=4096, description="Messages read ahead of replies per stream (bigger group commits)."
    )
    ingest_max_in_flight_bytes: int = Field(
        512 * MIB, gt=0, description="Image bytes held in memory by all ingest streams together."
    )
    commit_max_batch: int = Field(256, ge=1, description="Most images written per group commit.")
    decode_threads: int = Field(0, ge=0, description="Threads that decode and hash images; 0: one per CPU.")
    allowed_classes: list[str] = Field(
        default_factory=list, description="If set, camera labels must be one of these class names."
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="Seconds in-flight calls get to finish at shutdown.")
    store_open_timeout_s: float = Field(
        300.0,
        ge=0,
        description="At start, how long to keep trying a database that cannot be reached (health says "
        "NOT_SERVING meanwhile).",
    )
    store_check_s: float = Field(
        5.0, ge=0, description="How often health checks that the database answers (NOT_SERVING while not); 0: never."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or one JSON object each.")
    engine: str = Field(
        "auto", description="Inference engine: auto (TensorRT on an NVIDIA GPU, else onnxruntime), or a registry name."
    )
    classify_max_batch: int = Field(32, ge=1, le=1024, description="Most images per inference batch.")
    classify_max_wait_ms: float = Field(
        2.0, ge=0, description="How long a batch waits for more images after its first."
    )
    classify_max_queue: int = Field(256, ge=1, description="Classification requests waiting at most; more are refused.")
    model_poll_s: float = Field(5.0, gt=0, description="How often the server looks for a new live model version.")
    alert_group_similarity: float = Field(
        0.8, ge=-1.0, le=1.0, description="Cosine similarity at which an unusual image joins an open incident."
    )
    alert_group_window_s: float = Field(
        3600.0, gt=0, description="An incident takes images for this long after its last."
    )
    alert_poll_s: float = Field(1.0, gt=0, description="How often WatchAlerts looks for other processes' alerts.")
    inspect: bool = Field(
        True, description="Score stored images with the live model and its anomaly model; raise alerts."
    )
    server_torch_threads: int = Field(1, ge=1, description="Torch threads of the server (inspector, parity checks).")
    inspect_batch: int = Field(32, ge=1, le=1024, description="Images the inspector scores at a time.")
    inspect_poll_s: float = Field(1.0, gt=0, description="How often the inspector looks for new images when idle.")
    inspect_backlog: int = Field(1000, ge=0, description="At its first start, the inspector skips older images.")
    anomaly_false_alarm_rate: float = Field(
        0.01, gt=0, lt=1, description="Target share of known images that raise an alarm (threshold calibration)."
    )
    scheduler: bool = Field(
        True,
        description="Run updates from this server: the schedule, the automatic triggers and TriggerUpdate's queue.",
    )
    update_cron: str = Field(
        "0 2 * * *", description="When the scheduled update runs (crontab: minute hour day month weekday); '' = never."
    )
    update_timezone: str = Field("UTC", description="The time zone of update_cron, e.g. Europe/Berlin.")
    update_after_labels: int = Field(50, ge=0, description="Queue an update after this many new human labels (0: off).")
    update_after_alerts: int = Field(20, ge=0, description="Queue an update after this many alerted images (0: off).")
    update_misfire_grace_s: float = Field(
        6 * 3600.0, gt=0, description="A scheduled update missed (server down, busy) still runs within this time."
    )
    update_lease_s: float = Field(60.0, ge=5, description="An update worker silent this long is presumed dead.")
    update_check_s: float = Field(30.0, gt=0, description="How often the automatic triggers are checked.")
    keep_versions: int = Field(
        5, ge=1, description="Model versions kept on disk (newest first); the live one is always kept as well."
    )
    update: UpdateSettings = Field(
        default_factory=UpdateSettings,
        description="How updates train and gate a candidate ([update] table; CL_SERVICE_UPDATE__EPOCHS=...).",
    )
    anomaly: dict[str, Any] = Field(
        default_factory=dict,
        description="Anomaly model settings ([anomaly] table: image_size, epochs, ...; docs/anomaly.md); {}: defaults",
    )

    @field_validator("anomaly")
    @classmethod
    def _valid_anomaly_config(cls, values: dict[str, Any]) -> dict[str, Any]:
        if values:  # checked here, so that a typo fails at start; the import loads torch, so only when set
            from cl_service.anomaly.config import AnomalyConfig

            AnomalyConfig.model_validate(values)
        return values

    @field_validator("allowed_classes")
    @classmethod
    def _class_names_follow_the_rule(cls, names: list[str]) -> list[str]:
        for name in names:
            problem = class_name_problem(name)
            if problem:
                raise ValueError(problem)
        return names

    @field_validator("update_cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        if cron.strip():
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(cron)  # raises ValueError with the reason
        return cron

    @field_validator("update_timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r} (an IANA name such as Europe/Berlin)") from None
        return name

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, name: str) -> str:
        from cl_service.engines.base import engine_names

        if name != "auto" and name not in engine_names():
            raise ValueError(f"unknown engine {name!r}; choose auto or one of {', '.join(engine_names())}")
        return name

    @model_validator(mode="after")
    def _transport_fits_images(self) -> Settings:
        if self.max_message_bytes and self.max_message_bytes <= self.max_image_bytes:
            raise ValueError("max_message_bytes must exceed max_image_bytes, or oversized images end the stream")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'store.sqlite').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def transport_max_message_bytes(self) -> int:
        return self.max_message_bytes or 2 * self.max_image_bytes + MIB

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML source reads model_config["toml_file"], which load_settings sets when given a file.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the Settings: `overrides` (CLI flags) > environment > `config_file` (TOML) > defaults."""
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")

        class FromFile(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})

        settings_cls = FromFile
    return settings_cls(**{key: value for key, value in overrides.items() if value is not None})
