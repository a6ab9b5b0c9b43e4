"""A run's metrics: one JSON object per logged step in `metrics.jsonl`, and the loss curve drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .plots import loss_curve

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss.png"


class MetricsLog:
    """Appends records to RUN/metrics.jsonl. A fresh run starts the file anew; a resumed run keeps the records up to
    its checkpoint's step and drops those the stopped run wrote after it (they are about to be redone)."""

    def __init__(self, run_dir: Path, resumed_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(run_dir) / METRICS_FILE, enabled
        if not enabled:
            return
        if self.path.is_file():
            kept = [r for r in self.read() if resumed_step is not None and r.get("step", 0) <= resumed_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict[str, Any]]:
        """The records so far (a torn last line from a killed run is ignored)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")

    def plot(self, key: str, title: str) -> None:
        """Draw RUN/loss.png: metric `key` against the step."""
        if self.enabled:
            records = [r for r in self.read() if isinstance(r.get(key), (int, float))]
            loss_curve([r["step"] for r in records], [r[key] for r in records], self.path.parent / CURVE_FILE, title)
