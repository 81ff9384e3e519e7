"""Operators over gRPC: SubmitCorrection (per-item errors, new classes only when asked, corrections outrank camera
and pseudo-labels, the audit trail) and ListReviewQueue (ranking, reasons, filters, keyset pages)."""

from __future__ import annotations

import grpc
import pytest

from cl_service.client import CameraClient, CameraImage, Client
from cl_service.v1 import inspection_pb2 as pb
from replay_store.models import PredictionRow, utcnow
from replay_store.operator import save_predictions
from replay_store.store import PseudoLabel
from tests.conftest import ServerHandle, png_bytes

pytestmark = pytest.mark.integration


def _ingest(server: ServerHandle, count: int, label: str | None = None, start: int = 0) -> list[int]:
    images = [CameraImage(png_bytes(start + i), label=label) for i in range(count)]
    results = list(CameraClient(server.target, f"cam-{start}").stream(images))
    assert all(r.durable for r in results)
    return [r.sample_id for r in results]


def _reason(error: pb.Error) -> str:
    return error.reason


def test_corrections_are_checked_one_by_one_and_outrank_every_other_label(server: ServerHandle) -> None:
    store = server.running.core.store
    camera_labeled = _ingest(server, 2, label="good")
    unlabeled = _ingest(server, 3, start=100)
    store.add_pseudo_labels([PseudoLabel(unlabeled[0], "good", 0.97, "v0001")])
    with Client(server.target) as client:
        results = client.submit_corrections(
            "alice",
            [
                (unlabeled[0], "good"),  # over a pseudo-label
                (camera_labeled[0], "good"),  # confirms a camera label
                pb.Correction(sample_id=camera_labeled[1], class_name="scratch", note="the camera chute was wrong"),
                pb.Correction(sample_id=unlabeled[1], class_name="scratch", new_class=True),
                (unlabeled[2], "Bad Name"),
                (987654, "good"),
                pb.Correction(sample_id=unlabeled[2], class_name="good", note="x" * 1025),
            ],
        )
        assert [r.sample_id for r in results][:6] == [
            unlabeled[0],
            camera_labeled[0],
            camera_labeled[1],
            unlabeled[1],
            unlabeled[2],
            987654,
        ]
        assert [r.accepted for r in results] == [True, True, False, True, False, False, False]
        assert [_reason(r.error) for r in results if not r.accepted] == [
            "CLASS_UNKNOWN",
            "CLASS_NAME_INVALID",
            "SAMPLE_NOT_FOUND",
            "NOTE_TOO_LONG",
        ]
        assert "set new_class" in results[2].error.message
        assert results[0].label.source == pb.LABEL_SOURCE_OPERATOR and results[0].label.author == "alice"

        # with new_class now (scratch exists by now anyway): the operator's label wins over the camera's
        [again] = client.submit_corrections(
            "bob", [pb.Correction(sample_id=camera_labeled[1], class_name="scratch", note="chute")]
        )
        assert again.accepted
        sample = client.get_sample(camera_labeled[1])
        assert sample.effective_label.class_name == "scratch" and sample.effective_label.author == "bob"
        assert [label.source for label in sample.label_history] == [pb.LABEL_SOURCE_OPERATOR, pb.LABEL_SOURCE_CAMERA]
        assert sample.label_history[0].note == "chute"
        over_pseudo = client.get_sample(unlabeled[0])
        assert over_pseudo.effective_label.source == pb.LABEL_SOURCE_OPERATOR
        assert {label.source for label in over_pseudo.label_history} == {
            pb.LABEL_SOURCE_OPERATOR,
            pb.LABEL_SOURCE_PSEUDO,
        }
        # a later pseudo-label never displaces it
        assert store.add_pseudo_labels([PseudoLabel(unlabeled[0], "scratch", 0.99, "v0002")]) == 0
        assert client.get_sample(unlabeled[0]).effective_label.author == "alice"
        counts = {c.class_name: c for c in client.status().classes}
        assert counts["scratch"].operator_labels == 2

        invalid = grpc.StatusCode.INVALID_ARGUMENT
        for operator_id, corrections, reason in (
            ("", [(unlabeled[2], "good")], "OPERATOR_ID_INVALID"),
            ("bob smith", [(unlabeled[2], "good")], "OPERATOR_ID_INVALID"),
            ("bob", [], "CORRECTIONS_EMPTY"),
            ("bob", [(unlabeled[2], "good")] * 1001, "TOO_MANY_CORRECTIONS"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                client.submit_corrections(operator_id, corrections)  # type: ignore[arg-type]
            assert caught.value.code() == invalid and caught.value.details().startswith(reason)  # type: ignore[attr-defined]


def _prediction(sample_id: int, class_name: str, margin: float, anomalous: bool = False) -> PredictionRow:
    confidence = 0.5 + margin / 2
    return PredictionRow(
        sample_id=sample_id,
        model_version="v0001",
        class_name=class_name,
        confidence=confidence,
        margin=margin,
        top_classes={class_name: confidence, "other": 1 - confidence},
        anomaly_score=2.0 if anomalous else 0.1,
        anomaly_threshold=1.0,
        anomalous=anomalous,
        created_at=utcnow(),
    )


def test_the_review_queue_ranks_unlabeled_samples_by_how_much_a_label_would_help(server: ServerHandle) -> None:
    store = server.running.core.store
    _ingest(server, 25, label="good")  # good is common, scratch is rare
    _ingest(server, 1, label="scratch", start=50)
    ids = _ingest(server, 8, start=100)
    other_camera = _ingest(server, 2, start=200)
    sure, unsure, anomalous, disagreed, rare, very_unsure, labeled, sure2 = ids
    save_predictions(
        store,
        [
            _prediction(sure, "good", 0.9),
            _prediction(unsure, "good", 0.2),
            _prediction(anomalous, "good", 0.9, anomalous=True),
            _prediction(disagreed, "good", 0.9),
            _prediction(rare, "scratch", 0.9),
            _prediction(very_unsure, "good", 0.05),
            _prediction(labeled, "good", 0.01),
            _prediction(sure2, "good", 0.8),
            _prediction(other_camera[0], "good", 0.1),
            _prediction(other_camera[1], "good", 0.2, anomalous=True),
        ],
    )
    store.add_pseudo_labels([PseudoLabel(disagreed, "scratch", 0.95, "v0001")])
    with Client(server.target) as client:
        client.submit_corrections("alice", [(labeled, "good")])  # labeled by a person: out of the queue
        page = client.review_queue()
        order = [item.sample.sample_id for item in page.items]
        assert order == [
            other_camera[1],  # anomalous and unsure: 1 - 0.2 + 1
            anomalous,  # 1 - 0.9 + 1
            very_unsure,  # 0.95
            other_camera[0],  # 0.9
            unsure,  # 0.8
            rare,  # 1 - 0.9 + 0.5, and the newer sample of the two
            disagreed,  # 1 - 0.9 + 0.5
        ]
        assert page.total_size == 7 and page.next_page_token == ""
        reasons = {item.sample.sample_id: set(item.reasons) for item in page.items}
        assert reasons[other_camera[1]] == {pb.REVIEW_REASON_ANOMALOUS, pb.REVIEW_REASON_LOW_CONFIDENCE}
        assert reasons[disagreed] == {pb.REVIEW_REASON_DISAGREEMENT}
        assert reasons[rare] == {pb.REVIEW_REASON_RARE_CLASS}
        top = page.items[0]
        assert top.sample.prediction.anomalous and top.sample.prediction.model_version == "v0001"
        assert top.priority == pytest.approx(1.8)

        # pages of 3: the same order, nothing repeated, nothing missing
        seen: list[int] = []
        token = ""
        while True:
            page = client.review_queue(page_size=3, page_token=token)
            assert len(page.items) <= 3 and page.total_size == 7
            seen += [item.sample.sample_id for item in page.items]
            token = page.next_page_token
            if not token:
                break
        assert seen == order

        only_anomalous = client.review_queue(reason=pb.REVIEW_REASON_ANOMALOUS)
        assert [i.sample.sample_id for i in only_anomalous.items] == [other_camera[1], anomalous]
        camera = client.review_queue(camera_id="cam-200")
        assert [i.sample.sample_id for i in camera.items] == other_camera[::-1]

        for kwargs, reason in (
            ({"page_size": 501}, "PAGE_SIZE_INVALID"),
            ({"page_size": -1}, "PAGE_SIZE_INVALID"),
            ({"page_token": "bm90IGpzb24="}, "PAGE_TOKEN_INVALID"),
            ({"reason": 42}, "REVIEW_REASON_INVALID"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                client.review_queue(**kwargs)  # type: ignore[arg-type]
            assert caught.value.details().startswith(reason)  # type: ignore[attr-defined]
