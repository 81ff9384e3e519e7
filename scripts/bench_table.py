"""Fill the README's benchmark tables from bench/results/*.json (run by `make bench`).

Each benchmark has a block in README.md between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`;
this script replaces the block's contents with a table rendered from bench/results/NAME.json.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _common import markdown_table  # noqa: E402


def ingest(r: dict[str, Any]) -> str:
    rows = []
    for label, name in (("1stream", "1 stream"), ("4streams", "4 streams")):
        rows.append(
            [
                name,
                f"{r[f'images_per_s_{label}']:,.0f}",
                f"{r[f'mb_per_s_{label}']:,.1f}",
                f"{r[f'echo_images_per_s_{label}']:,.0f}",
                f"{r[f'echo_mb_per_s_{label}']:,.1f}",
                f"{r[f'durable_vs_echo_ratio_{label}']:.0%} (goal {r['goal_ratio']:.0%})",
            ]
        )
    header = ["streams", "durable images/s", "durable MB/s", "echo images/s", "echo MB/s", "durable / echo"]
    note = (
        f"\n\n{r['image_bytes']:,}-byte PNG images, median of {r['repeats']} runs, "
        f"{r['machine_cpus']} CPUs shared by client and server ({r['machine_platform']}, Python {r['machine_python']})."
    )
    return markdown_table(header, rows) + note


def references(r: dict[str, Any]) -> str:
    rows = []
    for strategy in ("naive", "cumulative", "joint", "replay", "der"):
        forgetting = r.get(f"{strategy}_forgetting")
        rows.append(
            [
                strategy,
                f"{r[f'{strategy}_final_accuracy']:.1%}",
                "" if forgetting is None else f"{100 * forgetting:.1f}",
                f"{r[f'{strategy}_train_seconds']:,.0f}",
            ]
        )
    header = ["strategy", "final accuracy", "forgetting (points)", "training seconds"]
    note = (
        f"\n\nxsdd, steps {r['steps']}; {r['train_images']} train / {r['test_images']} test images "
        f"({r['duplicates_removed']} duplicates removed), {r['image_size']}x{r['image_size']}, {r['epochs']} epochs "
        f"per step, replay/DER memory {r['mem_size']}, {r['machine_cpus']} CPUs."
    )
    return markdown_table(header, rows) + note


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {"ingest": ingest, "references": references}


def main() -> int:
    readme_path = REPO / "README.md"
    readme = readme_path.read_text()
    for name, render in RENDERERS.items():
        path = REPO / "bench" / "results" / f"{name}.json"
        if not path.exists():
            continue
        block = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.DOTALL)
        if not block.search(readme):
            raise SystemExit(f"README.md has no <!-- bench:{name} --> block")
        table = render(json.loads(path.read_text()))
        readme = block.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), readme)
    readme_path.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
