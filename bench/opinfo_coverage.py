"""OpInfo coverage of meshpar vs DTensor: every op of torch's op_db with float64 samples, on 2 gloo ranks.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/opinfo_coverage.py            # the whole database
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/opinfo_coverage.py --smoke    # 6 ops, seconds
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/opinfo_coverage.py --ops add,cumsum --systems meshpar

For each op and operand kind (first tensor split on dim 0 / everything replicated / first tensor a
partial sum; the other tensors replicated) both systems run the same float64 samples and are
compared with the dense op, forward and backward (see :mod:`meshpar.testing.opinfo`). Writes
``bench/results/opinfo_coverage-<date>.json`` (every record with its detail) and a markdown table
``bench/results/opinfo_coverage-<date>.md``; prints the summary and meshpar's wrong/crash list.

Runs on a 2-rank :class:`~meshpar.testing.WorkerPool` (gloo, CPU), ops in chunks; a chunk that
hangs or dies is re-run op by op, and an op that hangs alone is recorded as a crash ("hang").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshpar.testing import WorkerPool  # noqa: E402
from meshpar.testing.opinfo import (EVERYDAY, KINDS, SYSTEMS, failures, load_ops, merge_ranks,  # noqa: E402
                                    op_key, run_ops, summarize)

SMOKE = ("add", "sum", "cumsum", "cat", "matmul", "nn.functional.gelu")


def _run_chunk(pool: WorkerPool, names, systems, max_samples) -> list[dict]:
    return merge_ranks(pool.run(run_ops, (2,), ("x",), list(names), KINDS, systems, max_samples))


def run(names, systems, max_samples: int, chunk: int, log=print, progress: Path | None = None,
        mesh_timeout_s: float = 60.0) -> list[dict]:
    """Run the ops in chunks; after a failed collective (a desynchronized group) restart the pool and go on
    after the op that caused it (recorded as a crash). ``mesh_timeout_s``: gloo's collective timeout (a
    collective that waits longer is a crash; on a heavily shared machine 20 s was too short once)."""
    pool = WorkerPool(world_size=2, mesh_timeout_s=mesh_timeout_s, timeout_s=max(240.0, 4 * mesh_timeout_s))
    records: list[dict] = []
    t0 = time.time()
    todo = list(names)
    try:
        while todo:
            part, todo = todo[:chunk], todo[chunk:]
            try:
                got = _run_chunk(pool, part, systems, max_samples)
            except Exception as e:  # noqa: BLE001 - the pool died or hung: restart, blame the first op
                pool.restart()
                msg = f"hang or worker death: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                got = [{"op": part[0], "poisoned": True,
                        "results": {s: {k: {"status": "crash", "detail": msg} for k in KINDS} for s in systems}}]
            records += got
            if got and got[-1].get("poisoned"):
                log(f"collective failure at {got[-1]['op']}: restarting the pool")
                pool.restart()
                done = {r["op"] for r in got}
                todo = [n for n in part if n not in done and n.split(".")[0] not in done] + todo
            log(f"[{time.time() - t0:6.0f}s] {len(records)}/{len(names)} ops")
            if progress is not None:  # partial results survive an interrupted run
                progress.write_text(json.dumps({"done": len(records), "of": len(names), "records": records}))
    finally:
        pool.close()
    return records


def markdown(summary: dict, records, systems, date: str, seconds: float) -> str:
    lines = [f"OpInfo coverage, {date}, CPU, 2 gloo ranks, float64; {len(records)} op entries, {seconds:.0f} s.", "",
             "| operand kind | system | pass / attempted | pass % | refuse | wrong | crash |",
             "|---|---|---|---|---|---|---|"]
    for k in KINDS:
        for s in systems:
            c = summary[s][k]
            pct = 100.0 * c["pass"] / c["attempted"] if c["attempted"] else 0.0
            lines.append(f"| {k} | {s} | {c['pass']} / {c['attempted']} | {pct:.0f} % | {c['refuse']} | "
                         f"{c['wrong']} | {c['crash']} |")
    bad = failures(records, "meshpar")
    lines += ["", f"meshpar wrong/crash ({len(bad)}):", ""]
    lines += [f"- `{op}` [{kind}] **{st}**: {detail[:200]}" for op, kind, st, detail in bad]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few ops only (seconds)")
    ap.add_argument("--everyday", action="store_true", help="the CI slice of everyday ops")
    ap.add_argument("--ops", default="", help="comma-separated OpInfo names (name or name.variant)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--max-samples", type=int, default=2, help="samples per (op, kind), first applicable ones")
    ap.add_argument("--chunk", type=int, default=25, help="ops per pool call")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--update", default="", help="a full-run JSON: re-run --ops and replace their records in it")
    ap.add_argument("--mesh-timeout-s", type=float, default=60.0, help="gloo collective timeout (a longer wait is a crash)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    systems = tuple(s for s in args.systems.split(",") if s)
    if args.smoke:
        names = list(SMOKE)
    elif args.everyday:
        names = list(EVERYDAY)
    elif args.ops:
        names = args.ops.split(",")
    else:
        names = [op_key(o) for o in load_ops()]
    t0 = time.time()
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = run(names, systems, args.max_samples, args.chunk, progress=out / "opinfo_coverage.partial.json",
                  mesh_timeout_s=args.mesh_timeout_s)
    seconds = time.time() - t0
    summary = summarize(records, systems)
    tag = "smoke" if args.smoke else ("everyday" if args.everyday else ("ops" if args.ops else "full"))
    (out / "opinfo_coverage.partial.json").unlink(missing_ok=True)
    if args.update:
        old = json.loads(Path(args.update).read_text())
        fresh = {r["op"]: r for r in records}
        records = [fresh.pop(r["op"], r) for r in old["records"]] + list(fresh.values())
        old["meta"].setdefault("rerun", []).append({"date": date, "ops": sorted(r["op"] for r in fresh.values()) or
                                                   names, "seconds": seconds})
        summary = summarize(records, systems)
        Path(args.update).write_text(json.dumps({"meta": old["meta"], "summary": summary, "records": records},
                                                indent=1))
        md = markdown(summary, records, systems, old["meta"]["date"], old["meta"]["seconds"])
        Path(args.update).with_suffix(".md").write_text(md)
        print(md)
        return
    stem = out / f"opinfo_coverage-{tag}-{date}"
    meta = {"date": date, "where": "CPU, 2 gloo ranks", "dtype": "float64", "max_samples": args.max_samples,
            "mesh_timeout_s": args.mesh_timeout_s,
            "kinds": list(KINDS), "systems": list(systems), "seconds": seconds, "ops": len(records)}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1))
    md = markdown(summary, records, systems, date, seconds)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
