"""Trade-off plots for the report: accuracy drop vs size vs latency, one figure per target.

Each variant is a point at (size_mb, top1_drop), coloured by its p50 latency; the FP32 baseline
is the reference at (baseline size, 0). Variants outside the accuracy budget are drawn hollow.
"""

from __future__ import annotations

from pathlib import Path

from vitq.tasks._io import atomic_file
from vitq.tasks.task_kinds import accuracy_loss_pts

SECTION = "## Trade-offs per target"


def write_tradeoff_plots(summary: dict, plots_dir: Path) -> list[Path]:
    """One PNG per target with at least one variant: `plots_dir/tradeoff-<target>.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("tradeoff-*.png"):
        old.unlink()
    base = summary["baseline"]
    written = []
    for target in sorted({v["target"] for v in summary["variants"]}):
        vs = [v for v in summary["variants"] if v["target"] == target]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        lat = [v["latency_ms_p50"] for v in vs if v["latency_ms_p50"] is not None]
        norm = plt.Normalize(min(lat), max(lat)) if lat else None
        for v in vs:
            drop = accuracy_loss_pts(v)
            color = plt.cm.viridis(norm(v["latency_ms_p50"])) if norm and v["latency_ms_p50"] is not None else "grey"
            ax.scatter(v["size_mb"], drop, s=70, edgecolors=color, facecolors=color if v["passed"] else "none",
                       linewidths=1.8)
            ax.annotate(v["name"], (v["size_mb"], drop), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.scatter(base["size_mb"], 0.0, marker="*", s=140, c="black", label="FP32")
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_xlabel("size on disk, MB")
        ax.set_ylabel("mIoU drop vs FP32, points (or 100 - mask IoU %)" if summary.get("task") == "dense"
                      else "top-1 drop vs FP32, points (or 100 - agreement %)")
        ax.set_title(f"{summary['model']}: {target} variants (hollow: outside the budget)")
        if norm:
            bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
            bar.set_label("latency p50, ms")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = plots_dir / f"tradeoff-{target}.png"
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def append_plot_section(report_path: Path, plots: list[Path]) -> None:
    """Add (or replace) the trade-off section at the end of report.md, linking the plots relatively."""
    report_path = Path(report_path)
    text = report_path.read_text().split(f"\n{SECTION}\n")[0].rstrip("\n")
    if plots:
        links = [f"![{p.stem}]({p.relative_to(report_path.parent).as_posix()})" for p in plots]
        text += f"\n\n{SECTION}\n\n" + "\n\n".join(links)
    with atomic_file(report_path) as tmp:
        tmp.write_text(text + "\n")
