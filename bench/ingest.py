"""Ingest throughput: the real server with durable acks vs a bare gRPC echo server, side by side.

Both servers run as their own processes on free loopback ports and are driven by the same client (the
SDK's CameraClient, window 64) with the same messages: distinct 64 KiB PNG images (256x256 greyscale
noise; a tEXt chunk with a counter makes every file's bytes unique, so content addressing cannot
deduplicate them). The echo server parses each IngestRequest and answers STORED at once, storing nothing;
the real server answers only after the image and its row are on disk (group commit + fdatasync).
One stream and 4 concurrent streams, each measured `REPEATS` times alternating between the two
servers; the median run counts. Afterwards every durable image is checked to be in the store.

Run: `python bench/ingest.py` (no arguments). Writes bench/results/ingest.json.
"""

from __future__ import annotations

import asyncio
import io
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    cl_service_command,
    free_port,
    machine,
    markdown_table,
    stop,
    wait_for_port,
    write_results,
)

from cl_service.api.servicer import SERVICE_NAME
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.v1 import inspection_pb2 as pb

IMAGE_SIDE = 256  # 256 x 256 greyscale noise: 64 KiB of pixels, about 64.5 KB as PNG
IMAGES_ONE_STREAM = 4000
IMAGES_PER_STREAM_OF_FOUR = 1500
WARMUP_IMAGES = 200
REPEATS = 3
GOAL_RATIO = 0.60


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class ImageFactory:
    """Distinct valid PNG files of the same size, cheap to make: a few noise images, each copy tagged."""

    def __init__(self, variants: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._bases = []
        for _ in range(variants):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)).save(buffer, "PNG")
            png = buffer.getvalue()
            ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
            self._bases.append((png[:ihdr_end], png[ihdr_end:]))
        self.size = len(self.make("0"))

    def make(self, tag: str) -> bytes:
        head, tail = self._bases[hash(tag) % len(self._bases)]
        return head + _png_chunk(b"tEXt", b"bench\x00" + tag.encode()) + tail


# ---------------------------------------------------------------------------------------------------------
# The echo server: same method path and messages, no storage.


async def _echo(requests: AsyncIterator[pb.IngestRequest], context: Any) -> AsyncIterator[pb.IngestReply]:
    sequence = 0
    async for request in requests:
        sequence += 1
        yield pb.IngestReply(request_id=request.request_id, sequence=sequence, status=pb.INGEST_STATUS_STORED)


async def _serve_echo(port: int) -> None:
    limit = 64 << 20
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Ingest": grpc.stream_stream_rpc_method_handler(
                _echo,
                request_deserializer=pb.IngestRequest.FromString,
                response_serializer=pb.IngestReply.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# ---------------------------------------------------------------------------------------------------------
# The client side.


def _camera_images(factory: ImageFactory, prefix: str, count: int) -> Iterator[CameraImage]:
    for index in range(count):
        request_id = f"{prefix}-{index}"
        yield CameraImage(factory.make(request_id), request_id=request_id)


def run_streams(target: str, factory: ImageFactory, prefix: str, streams: int, per_stream: int) -> dict[str, Any]:
    """Stream `per_stream` images on each of `streams` concurrent cameras; time from first send to last reply."""
    results: list[list[str]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []
    start = threading.Barrier(streams + 1)

    def camera(index: int) -> None:
        client = CameraClient(target, f"{prefix}-cam{index}")
        images = _camera_images(factory, f"{prefix}-cam{index}", per_stream)
        try:
            start.wait()
            for result in client.stream(images):
                if not result.durable:
                    raise RuntimeError(f"{result.request_id}: {result.status} {result.error_reason}")
                results[index].append(result.request_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=camera, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed; first: {errors[0]!r}")
    answered = sum(len(r) for r in results)
    if answered != streams * per_stream:
        raise RuntimeError(f"{answered} replies for {streams * per_stream} images")
    return {"images": answered, "seconds": elapsed, "images_per_s": answered / elapsed}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--echo-server":  # the echo server's own process
        asyncio.run(_serve_echo(int(sys.argv[2])))
        return 0

    # `kill` (SIGTERM) ends the run through the `finally` below, which stops both servers and removes their folder.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    factory = ImageFactory()
    print(f"images: {IMAGE_SIDE}x{IMAGE_SIDE} greyscale PNG, {factory.size:,} bytes each", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=Path.cwd()) as tmp:
        data_dir = Path(tmp) / "data"
        durable_port, echo_port = free_port(), free_port()
        durable = subprocess.Popen(
            cl_service_command("serve", "--data-dir", str(data_dir), "--bind", f"127.0.0.1:{durable_port}")
        )
        echo = subprocess.Popen([sys.executable, __file__, "--echo-server", str(echo_port)])
        try:
            wait_for_port(durable_port, durable)
            wait_for_port(echo_port, echo)
            targets = {"durable": f"127.0.0.1:{durable_port}", "echo": f"127.0.0.1:{echo_port}"}
            with Client(targets["durable"]) as client:
                client.wait_ready()
            figures = measure(targets, factory)
            stored = verify(targets["durable"], factory)
        finally:
            stop(durable)
            stop(echo)
        store_bytes = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())

    figures.update(
        {
            "image_bytes": factory.size,
            "images_stored_and_verified": stored,
            "store_bytes_on_disk": store_bytes,
            "repeats": REPEATS,
            "goal_ratio": GOAL_RATIO,
            **machine(),
        }
    )
    rows = []
    for streams, label in ((1, "1stream"), (4, "4streams")):
        rows.append(
            [
                f"{streams} stream{'s' if streams > 1 else ''}",
                figures[f"images_per_s_{label}"],
                figures[f"mb_per_s_{label}"],
                figures[f"echo_images_per_s_{label}"],
                figures[f"echo_mb_per_s_{label}"],
                f"{figures[f'durable_vs_echo_ratio_{label}']:.0%}",
            ]
        )
    print()
    header = ["streams", "durable img/s", "durable MB/s", "echo img/s", "echo MB/s", "durable / echo"]
    print(markdown_table(header, rows))
    path = write_results("ingest", figures)
    print(f"\n{figures['images_stored_and_verified']:,} images checked in the store; results in {path}")
    return 0


def measure(targets: dict[str, str], factory: ImageFactory) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, target in targets.items():  # warm up both servers and the client's code paths
        run_streams(target, factory, f"warmup-{name}", 1, WARMUP_IMAGES)
    for streams, per_stream, label in ((1, IMAGES_ONE_STREAM, "1stream"), (4, IMAGES_PER_STREAM_OF_FOUR, "4streams")):
        runs: dict[str, list[float]] = {"durable": [], "echo": []}
        for repeat in range(REPEATS):
            for name, target in targets.items():
                run = run_streams(target, factory, f"{label}-r{repeat}-{name}", streams, per_stream)
                runs[name].append(run["images_per_s"])
                print(f"{label:9} {name:8} run {repeat + 1}: {run['images_per_s']:8,.0f} images/s", flush=True)
        durable, echo = statistics.median(runs["durable"]), statistics.median(runs["echo"])
        prefix = {"durable": "", "echo": "echo_"}
        for name, value in (("durable", durable), ("echo", echo)):
            figures[f"{prefix[name]}images_per_s_{label}"] = round(value, 1)
            figures[f"{prefix[name]}mb_per_s_{label}"] = round(value * factory.size / 1e6, 1)
            figures[f"{prefix[name]}images_per_s_{label}_runs"] = ", ".join(f"{v:.0f}" for v in runs[name])
        figures[f"durable_vs_echo_ratio_{label}"] = round(durable / echo, 3)
        figures[f"images_{label}"] = streams * per_stream
    return figures


def verify(target: str, factory: ImageFactory) -> int:
    """Every image the durable server acknowledged is in the store; a sample of them read back identical."""
    expected = WARMUP_IMAGES + REPEATS * (IMAGES_ONE_STREAM + 4 * IMAGES_PER_STREAM_OF_FOUR)
    with Client(target) as client:
        status = client.status()
        if status.samples_total != expected or status.blobs_total != expected:
            raise RuntimeError(
                f"store holds {status.samples_total} samples / {status.blobs_total} blobs, not {expected}"
            )
        for sample_id in (1, expected // 2, expected):
            sample = client.get_sample(sample_id, include_image=True)
            request_id = sample.request_id
            if sample.image != factory.make(request_id):
                raise RuntimeError(f"sample {sample_id} ({request_id}) does not read back byte-identical")
    return expected


if __name__ == "__main__":
    sys.exit(main())
