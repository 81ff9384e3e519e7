"""Model versions written in NVIDIA Triton's model-repository layout, for a site that outgrows one process.

    <out>/<model name>/config.pbtxt
    <out>/<model name>/labels.txt          # the newest version's classes
    <out>/<model name>/<n>/model.onnx      # n = the number of vNNNN

One Triton model holds every chosen version. That works because a head only grows: output i means the same class
in every version, so the newest class list labels them all (older versions have fewer outputs: the output's size
is variable). Versions must share the input size. Triton itself is not run here; `tritonserver
--model-repository=<out>` serves the folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cl_service.engines.export import INPUT, ONNX_FILE, OUTPUT, export_onnx
from cl_service.learning.repository import ModelRepository


def write_triton_repository(
    repository: ModelRepository,
    versions: Sequence[str],
    out: Path,
    *,
    model_name: str = "cl_inspection",
    max_batch_size: int = 32,
    max_queue_delay_us: int = 2000,
    gpu: bool = False,
) -> Path:
    """Write (replace) `out/model_name` for `versions`; returns that folder."""
    if not versions:
        raise ValueError("choose at least one version")
    ordered = sorted(versions, key=_number)
    models = {version: repository.load_model(version) for version in ordered}
    newest = models[ordered[-1]]
    sizes = {model.config.image_size for model in models.values()}
    if len(sizes) != 1:
        raise ValueError(f"one Triton model needs one input size; these versions use {sorted(sizes)}")
    for version, model in models.items():
        if list(newest.classes[: len(model.classes)]) != list(model.classes):
            raise ValueError(
                f"{version}'s classes are not a prefix of {ordered[-1]}'s: their outputs cannot share one label file"
            )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{model_name}-") as scratch:
        staged = Path(scratch) / model_name
        for version, model in models.items():
            target = staged / str(_number(version)) / ONNX_FILE
            target.parent.mkdir(parents=True)
            source = repository.folder(version) / ONNX_FILE
            if source.is_file():
                shutil.copyfile(source, target)
            else:
                export_onnx(model, target)
        (staged / "labels.txt").write_text("\n".join(newest.classes) + "\n")
        size = newest.config.image_size
        (staged / "config.pbtxt").write_text(
            _config(model_name, size, max_batch_size, max_queue_delay_us, gpu, [_number(v) for v in ordered])
        )
        final = out / model_name
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
    return final


def _number(version: str) -> int:
    if not (version.startswith("v") and version[1:].isdigit()):
        raise ValueError(f"not a model version name: {version!r}")
    return int(version[1:])


def _config(name: str, size: int, max_batch: int, delay_us: int, gpu: bool, versions: list[int]) -> str:
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "{OUTPUT}"
    data_type: TYPE_FP32
    dims: [ -1 ]
    label_filename: "labels.txt"
  }}
]
version_policy: {{ specific: {{ versions: [ {", ".join(map(str, versions))} ] }} }}
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}
instance_group [
  {{
    count: 1
    kind: {"KIND_GPU" if gpu else "KIND_CPU"}
  }}
]
"""
