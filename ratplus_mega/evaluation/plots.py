"""Pictures of evaluation results, written as PNG beside the JSON: recall by pattern, NIAH depth × length."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_bars(groups: dict[str, dict[str, float]], path: Path, *, title: str = "associative recall") -> Path:
    """Grouped bars: one group per key of ``groups`` (a model, a phase), one bar per pattern, recall in %."""
    plt = _pyplot()
    patterns = list(dict.fromkeys(p for values in groups.values() for p in values))
    width = 0.8 / max(len(patterns), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) + 2), 3.8))
    for j, pattern in enumerate(patterns):
        xs = [i + (j - (len(patterns) - 1) / 2) * width for i in range(len(groups))]
        ys = [100 * values.get(pattern, float("nan")) for values in groups.values()]
        bars = ax.bar(xs, ys, width, label=pattern)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("recall (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def niah_heatmaps(rows: list[dict], path: Path) -> Path:
    """One depth × length heatmap of accuracy per (variant, pattern) of the ``niah`` result rows."""
    plt = _pyplot()
    panels = list(dict.fromkeys((r["variant"], r["pattern"]) for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    variants = list(dict.fromkeys(v for v, _ in panels))
    patterns = list(dict.fromkeys(p for _, p in panels))
    fig, axes = plt.subplots(len(variants), len(patterns), squeeze=False, layout="constrained",
                             figsize=(2.8 * len(patterns) + 1.2, 2.4 * len(variants) + 0.4))
    image = None
    for i, variant in enumerate(variants):
        for j, pattern in enumerate(patterns):
            ax = axes[i][j]
            grid = [[next((100 * r["recall"] for r in rows if (r["variant"], r["pattern"], r["length"], r["depth"])
                           == (variant, pattern, n, d)), float("nan")) for n in lengths] for d in depths]
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="upper")
            for y, line in enumerate(grid):
                for x, value in enumerate(line):
                    ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 60 else "black")
            ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(f"{variant}, {pattern}", fontsize=8)
            if i == len(variants) - 1:
                ax.set_xlabel("context length (tokens)", fontsize=7)
            if j == 0:
                ax.set_ylabel("needle depth", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="answered (%)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, *, xlabel: str = "global batch") -> Path:
    """One line per named curve of (step, loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
