"""Training curves from a run's `metrics.jsonl` in one PNG (`m2det plot WORKDIR`; also
written at the end of `m2det train`): loss (total, localisation, classification),
learning rate, images/s and the evaluation metric (COCO AP and AP50, or VOC mAP)
against the step. Matplotlib's object API with the Agg canvas: no display, no global
backend switch.
"""

from __future__ import annotations

import json
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from m2det_jax.paths import as_path

PANELS = (
    ("loss", ("loss", "loc_loss", "conf_loss")),
    ("learning rate", ("lr",)),
    ("images / s", ("images_per_sec",)),
    ("evaluation", ("AP", "AP50", "mAP")),
)


def read_curves(workdir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} of `workdir/metrics.jsonl` for the plotted metrics; a
    step logged twice (after a resume) keeps its last value."""
    path = as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {os.fspath(workdir)}")
    wanted = {k for _, keys in PANELS for k in keys}
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k in wanted & row.keys():
            series.setdefault(k, {})[int(row["step"])] = float(row[k])
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in series.items()}


def curves_figure(curves: dict[str, tuple[list[int], list[float]]]) -> Figure:
    """A 2 x 2 figure of `read_curves` output, one line per metric (labelled by name)."""
    fig = Figure(figsize=(10, 7), dpi=100)
    for i, (title, keys) in enumerate(PANELS):
        ax = fig.add_subplot(2, 2, i + 1)
        ax.set_title(title)
        ax.set_xlabel("step")
        for k in keys:
            if k in curves:
                ax.plot(*curves[k], label=k, marker="o" if title == "evaluation" else None)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
            if title == "learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_curves(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Writes the curves of `workdir` to `out` (default `workdir/curves.png`); its path."""
    fig = curves_figure(read_curves(workdir))
    target = as_path(out) if out is not None else as_path(workdir) / "curves.png"
    FigureCanvasAgg(fig)
    with target.open("wb") as f:
        fig.savefig(f, format="png")
    return os.fspath(target)
