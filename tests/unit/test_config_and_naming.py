"""Settings sources and naming rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cl_service.config import load_settings
from replay_store.naming import class_name_problem, identifier_problem


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cl.toml"
    config.write_text('bind = "127.0.0.1:7000"\nmax_image_bytes = 1000\nstream_max_in_flight = 8\n')
    monkeypatch.setenv("CL_SERVICE_MAX_IMAGE_BYTES", "2000")
    settings = load_settings(config, stream_max_in_flight=4)
    assert settings.bind == "127.0.0.1:7000"  # file
    assert settings.max_image_bytes == 2000  # environment over file
    assert settings.stream_max_in_flight == 4  # flag over file
    assert load_settings().bind == "127.0.0.1:50051"  # default: loopback only


def test_unknown_and_invalid_settings_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "cl.toml"
    config.write_text("max_imag_bytes = 5\n")
    with pytest.raises(ValidationError, match="max_imag_bytes"):
        load_settings(config)
    with pytest.raises(ValidationError, match="naming rule"):
        load_settings(allowed_classes=["Good"])
    with pytest.raises(ValidationError, match="max_message_bytes"):
        load_settings(max_image_bytes=100, max_message_bytes=50)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CL_SERVICE_DATABASE_URL", raising=False)  # the suite's PostgreSQL run sets it
    settings = load_settings(data_dir=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'store.sqlite'}"
    assert settings.transport_max_message_bytes > settings.max_image_bytes


@pytest.mark.parametrize("name", ["good", "scratch_2", "a", "a" * 64])
def test_valid_class_names(name: str) -> None:
    assert class_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "Good", "2nd", "with space", "a" * 65, "dash-ed", "ünicode", "a\n"])
def test_invalid_class_names(name: str) -> None:
    assert class_name_problem(name)


def test_identifiers() -> None:
    assert identifier_problem("camera_id", "line-3:cam.7@plant") is None
    assert identifier_problem("camera_id", "") == "camera_id is missing"
    assert identifier_problem("request_id", "../etc")
    assert identifier_problem("request_id", "x" * 129)


def test_update_settings_come_from_the_update_table_and_nested_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cl.toml"
    config.write_text("[update]\nlwf_weight = 0.5\nepochs = 7\n\n[update.model]\nimage_size = 128\n")
    monkeypatch.setenv("CL_SERVICE_UPDATE__EPOCHS", "2")
    update = load_settings(config).update
    assert (update.lwf_weight, update.epochs, update.model.image_size) == (0.5, 2, 128)
    assert update.model.backbone == "tf_efficientnet_lite0" and update.gate_tolerance == 0.02  # defaults kept
    config.write_text("[update]\ngate_tolerence = 0.1\n")
    with pytest.raises(ValidationError, match="gate_tolerence"):
        load_settings(config)


def test_the_learning_guide_lists_every_update_setting_with_its_default() -> None:
    from cl_service.learning.settings import ModelConfig, UpdateSettings

    guide = (Path(__file__).resolve().parents[2] / "docs" / "learning.md").read_text()
    for prefix, cls in (("", UpdateSettings), ("model.", ModelConfig)):
        for name, field in cls.model_fields.items():
            if name == "model":
                continue
            default = field.default if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
            shown = list(default) if isinstance(default, tuple) else default
            assert f"| `{prefix}{name}` | `{shown}` |" in guide, f"docs/learning.md: {prefix}{name} (default {shown})"
