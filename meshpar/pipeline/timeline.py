"""Drawing schedules from their action tables: ASCII and matplotlib timelines.

Both use :func:`meshpar.pipeline.simulate.simulate` with unit forward time and backward time
``t_bwd`` (2 by default), so what is drawn is what the executor's table does.
"""
from __future__ import annotations

from .schedules import F, Schedule
from .simulate import simulate


def ascii_timeline(sched: Schedule, t_fwd: int = 1, t_bwd: int = 2) -> str:
    """One line per pipe rank, two characters per time unit; idle time is ``..``.

    A forward of micro-batch ``m`` is ``F<m>`` (one unit), a backward ``B<m>`` repeated for its
    ``t_bwd`` units. Chunk 0 is upper case, chunk 1 lower case (``f``/``b``), alternating for
    more chunks. Micro-batches from 10 on print as letters (base 36).
    """
    tl = simulate(sched, t_fwd, t_bwd)
    width = int(round(tl.makespan))
    sym = "0123456789abcdefghijklmnopqrstuvwxyz"
    lines = [f"{sched.name}: p={sched.pipe_size} m={sched.num_microbatches} chunks={sched.chunks}, "
             f"bubble {tl.bubble_fraction:.1%} (theory {sched.theoretical_bubble():.1%})"]
    for r, ev in enumerate(tl.events):
        row = [".."] * width
        for start, end, a in ev:
            letter = "F" if a.kind == F else "B"
            cell = (letter if a.chunk % 2 == 0 else letter.lower()) + sym[a.mb % len(sym)]
            for t in range(int(round(start)), int(round(end))):
                row[t] = cell
        lines.append(f"rank {r}: " + "".join(row))
    return "\n".join(lines)


def plot_timeline(sched: Schedule, path: str, t_fwd: float = 1.0, t_bwd: float = 2.0, title: str | None = None) -> None:
    """Save a Gantt chart of ``sched`` (one row per rank, forward blue, backward green; a darker
    shade per chunk; the micro-batch index on each box) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = simulate(sched, t_fwd, t_bwd)
    p = sched.pipe_size
    fig, ax = plt.subplots(figsize=(max(6.0, tl.makespan * 0.28), 0.55 * p + 1.1))
    fwd_cols = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
    bwd_cols = ["#a1d99b", "#41ab5d", "#006d2c", "#00441b"]
    for r, ev in enumerate(tl.events):
        for start, end, a in ev:
            cols = fwd_cols if a.kind == F else bwd_cols
            ax.broken_barh([(start, end - start)], (p - 1 - r - 0.4, 0.8), facecolors=cols[a.chunk % len(cols)],
                           edgecolor="white", linewidth=0.6)
            ax.text((start + end) / 2, p - 1 - r, str(a.mb), ha="center", va="center", fontsize=7,
                    color="white" if a.chunk else "black")
    ax.set_yticks(range(p))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(p))])
    ax.set_xlim(0, tl.makespan)
    ax.set_xlabel(f"time (forward = {t_fwd:g}, backward = {t_bwd:g} per chunk)")
    from matplotlib.patches import Patch

    handles = [Patch(color=fwd_cols[c % 4], label=f"forward, chunk {c}") for c in range(sched.chunks)] + \
              [Patch(color=bwd_cols[c % 4], label=f"backward, chunk {c}") for c in range(sched.chunks)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_title(title or f"{sched.name}: p={p}, m={sched.num_microbatches}, chunks={sched.chunks}, "
                 f"bubble {tl.bubble_fraction:.1%} (theory {sched.theoretical_bubble():.1%})", fontsize=9)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
