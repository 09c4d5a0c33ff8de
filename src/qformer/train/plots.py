"""Loss and metric curves from ``metrics.jsonl`` as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

SKIP = {"step", "epoch", "lr", "skipped", "samples_per_second"}


def plot_metrics(metrics_file: Path, out: Path) -> Path | None:
    """One panel per logged quantity (training losses, evaluation metrics) against the step."""
    if not metrics_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    if not series:
        return None
    columns = min(3, len(series))
    rows = (len(series) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, (steps, values)) in zip(axes.flat, sorted(series.items())):
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out
