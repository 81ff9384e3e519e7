"""Bearer tokens and roles on a real server: every RPC x every role x no / malformed / unknown / revoked token.

An allowed role gets past the check (the call then answers whatever its empty request deserves: INVALID_ARGUMENT,
NOT_FOUND, a deadline on an endless stream, or OK); a role that may not call the method gets PERMISSION_DENIED;
no token, a malformed header, an unknown or a revoked token get UNAUTHENTICATED. Health checks need no token.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cl_service.api.server import server_in_thread, start_server
from cl_service.auth import ALLOWED
from cl_service.cli import main
from cl_service.client import Client, channel
from cl_service.config import load_settings
from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc
from replay_store.store import Store
from replay_store.tokens import create_token, list_tokens, revoke_token
from tests.conftest import store_url

pytestmark = pytest.mark.integration

ROLES = ("camera", "operator", "admin")
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

UNARY: dict[str, Any] = {
    "Classify": pb.ClassifyRequest(),
    "SubmitCorrection": pb.SubmitCorrectionRequest(),
    "ListReviewQueue": pb.ListReviewQueueRequest(),
    "GetSample": pb.GetSampleRequest(sample_id=987654),
    "AcknowledgeAlert": pb.AcknowledgeAlertRequest(),
    "TriggerUpdate": pb.TriggerUpdateRequest(),
    "ListModels": pb.ListModelsRequest(),
    "ActivateModel": pb.ActivateModelRequest(),
    "GetStatus": pb.GetStatusRequest(),
}
STREAMING: dict[str, Any] = {
    "WatchAlerts": pb.WatchAlertsRequest(),
    "WatchUpdate": pb.WatchUpdateRequest(run_id=987654),
}


def _call(stub: Any, method: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status code the server answers `method` with (OK when it completed)."""
    try:
        if method == "Ingest":
            list(stub.Ingest(iter(()), metadata=metadata, timeout=10))
        elif method in STREAMING:
            list(getattr(stub, method)(STREAMING[method], metadata=metadata, timeout=1.5))
        else:
            getattr(stub, method)(UNARY[method], metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_every_role_and_every_bad_token(tmp_path: Path) -> None:
    assert set(ALLOWED) == {*UNARY, *STREAMING, "Ingest"}, "a new RPC needs a row in ALLOWED and in this test"
    settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", auth=True, auth_cache_s=0)
    with server_in_thread(settings) as running:
        store = running.core.store
        secrets = {role: create_token(store, f"t-{role}", role, "test")[1] for role in ROLES}
        _, revoked = create_token(store, "t-revoked", "admin", "test")
        revoke_token(store, "t-revoked")
        target = f"127.0.0.1:{running.port}"
        with grpc.insecure_channel(target) as chan:
            stub = pb_grpc.InspectionServiceStub(chan)
            health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
            for method in ALLOWED:
                for role in ROLES:
                    code = _call(stub, method, (("authorization", f"Bearer {secrets[role]}"),))
                    if role in ALLOWED[method]:
                        assert code not in AUTH_CODES, (method, role, code)
                    else:
                        assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role, code)
                for bad in ((), (("authorization", "Basic abc"),), (("authorization", "Bearer clst_made_up"),),
                            (("authorization", f"Bearer {revoked}"),)):  # fmt: skip
                    assert _call(stub, method, bad) == grpc.StatusCode.UNAUTHENTICATED, (method, bad)
        # the SDK carries the token; the error says what is missing
        with Client(target, token=secrets["operator"]) as client:
            assert client.status().live_model_version == ""
        with Client(target) as client, pytest.raises(grpc.RpcError) as caught:
            client.status()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (caught.value.details() or "")
        with channel(target, token=secrets["camera"]) as chan, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.InspectionServiceStub(chan).ListModels(pb.ListModelsRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs the role admin or operator; this token's role is camera" in (caught.value.details() or "")


def test_without_auth_the_server_refuses_to_leave_loopback(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", bind="0.0.0.0:0")
    with pytest.raises(RuntimeError, match=r"refusing to listen on 0\.0\.0\.0 without authentication"):
        asyncio.run(start_server(settings))


def test_token_commands_create_list_and_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["token", "--data-dir", str(tmp_path / "data"), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("create", "line-3", "--role", "camera", "--by", "alice")
    assert code == 0
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("clst_") and len(secret) > 40
    code, _, err = cli("create", "line-3", "--role", "camera")
    assert code == 2 and "exists already" in err
    with pytest.raises(SystemExit):
        cli("create", "x", "--role", "root")
    assert "invalid choice" in capsys.readouterr().err
    assert cli("revoke", "line-3")[0] == 0
    assert "no token named 'nope'" in cli("revoke", "nope")[2]
    code, out, _ = cli("list")
    assert code == 0 and "line-3\tcamera" in out and "revoked" in out
    # the store's flags may also come after the token command's own
    assert main(["token", "list", "--data-dir", str(tmp_path / "data")]) == 0
    assert "line-3\tcamera" in capsys.readouterr().out
    store = Store.open(store_url(tmp_path / "data"), tmp_path / "data" / "blobs")
    try:
        (row,) = list_tokens(store)
        assert row.created_by == "alice" and row.revoked_at is not None
        assert secret not in row.token_sha256  # only the digest is stored
    finally:
        store.close()
