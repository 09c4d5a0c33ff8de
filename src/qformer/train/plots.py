"""Loss and metric curves from ``metrics.jsonl`` as a PNG: the training losses and the learning
rate first, then the evaluation, one set after another (its recall curves in one panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path

NOT_PLOTTED = {"step", "epoch", "skipped", "bad_steps", "samples_per_second"}
NOT_CURVES = {"pairs", "count"}  # evaluation facts, not curves
RECALL = re.compile(r"^(txt_r|img_r|r_mean|chance_r)")  # drawn together, chance among them

Series = dict[str, tuple[list[int], list[float]]]
Panel = tuple[str, list[str]]  # title, the series drawn in it


def read_series(metrics_file: Path) -> Series:
    """Every logged number by name: (steps, values)."""
    series: Series = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in NOT_PLOTTED and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(value)
    return series


def panels(names: list[str]) -> list[Panel]:
    """The panels in order: ``loss``, the other training losses, ``lr``; then per evaluation set
    (``eval/<metric>`` or ``eval/<set>/<metric>``, in the order logged) its recall curves
    together and each other metric alone."""
    training = [n for n in names if not n.startswith("eval/") and n != "lr"]
    ordered: list[Panel] = [(n, [n]) for n in sorted(training, key=lambda n: (n != "loss", n))]
    ordered += [("lr", ["lr"])] if "lr" in names else []
    sets: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("eval/"):
            sets.setdefault(name.rpartition("/")[0], []).append(name)
    for prefix, members in sets.items():
        recall = [n for n in members if RECALL.match(n.rpartition("/")[2])]
        ordered += [(f"{prefix} recall (%)", recall)] if recall else []
        ordered += [(n, [n]) for n in members if n not in recall and n.rpartition("/")[2] not in NOT_CURVES]
    return ordered


def plot_metrics(metrics_file: Path, out: Path) -> Path | None:
    """Draw :func:`panels` of ``metrics_file`` against the step into ``out``."""
    if not metrics_file.is_file():
        return None
    series = read_series(metrics_file)
    layout = panels(list(series))
    if not layout:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(layout))
    rows = (len(layout) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, layout):
        for name in names:
            steps, values = series[name]
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name.rpartition("/")[2])
        if len(names) > 1:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layout):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out
