"""Draw the pipeline schedules from their action tables (PNG into docs/img/, ASCII to stdout).

    python examples/pipeline/draw_schedules.py [--out docs/img]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from meshpar.pipeline import make_schedule  # noqa: E402
from meshpar.pipeline.timeline import ascii_timeline, plot_timeline  # noqa: E402

CASES = [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs", "img"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for name, p, m, v in CASES:
        s = make_schedule(name, p, m, v)
        # a chunk holds 1/v of the rank's layers, so its forward/backward take 1/v of the time
        plot_timeline(s, os.path.join(a.out, f"pipeline_{name}.png"), t_fwd=1 / v, t_bwd=2 / v)
        print(ascii_timeline(s))
        print()


if __name__ == "__main__":
    main()
