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


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {"ingest": ingest}


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
