"""Training GPTs larger than the GPU: meshpar's chunk manager vs FSDP2 ``CPUOffloadPolicy`` on one GPU.

    # GPU (one H100 80 GB): the 2.78B and 4.85B comparisons, then the largest size that trains
    python bench/offload.py --sizes 2.78b,4.85b --modes meshpar,fsdp2 --largest 8.5b,10.1b,11.7b
    # one run in this process (what the driver starts per size and mode, with a timeout):
    python bench/offload.py --run meshpar --size 2.78b
    # CPU smoke test (tiny GPT, simulated device budget that forces chunks to move; checks the
    # losses against plain torch AdamW and the driver end to end; times mean nothing):
    python bench/offload.py --smoke

Both sides train the same GPT (``meshpar.models.gpt`` as pipeline blocks, see :func:`build_blocks`):
sequence 2048, batch 4 (``--batch``), vocabulary 50304, bf16 compute, fp32 master weights and Adam
moments, activation checkpointing per transformer block (``meshpar.memory.checkpoint_activations``).

* ``meshpar``: ``meshpar.memory.offload(blocks, units=<each block>, memory="auto")``: parameter
  chunks on the GPU as far as they fit, optimizer-state chunks placed by the warm-up trace (GPU
  AdamW for those that fit, CPU AdamW overlapped with the backward for the rest).
* ``fsdp2``: ``fully_shard`` at world size 1 on every block and the root with
  ``CPUOffloadPolicy(pin_memory=True)`` and ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``; ``torch.optim.AdamW(fused=True)`` on the CPU (foreach when fused fails).

Per run: tokens/s (median step over ``--iters`` steps after ``--warmup``), MFU (model FLOPs
``6N + 12·L·C·T`` per token over 989 TFLOP/s bf16 dense, the issue's convention), peak GPU memory
(``max_memory_allocated``) and peak host memory (``VmHWM``), and memory sampled every 2 ms over
the last step (plotted to ``bench/results/offload-memory.png``). Each size/mode is a subprocess with
a timeout, so an out-of-memory run does not stop the others. JSON goes to ``bench/results/``.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import base_parser, results_dir  # noqa: E402
import meshpar.memory as mm  # noqa: E402

PEAK_BF16 = 989e12       # H100 SXM dense bf16 FLOP/s
VOCAB = 50304
#: name -> (n_layer, n_embd, n_head)
SIZES = {"tiny": (2, 64, 4), "125m": (12, 768, 12), "1.3b": (24, 2048, 16), "2.78b": (32, 2560, 20),
         "4.85b": (40, 3072, 24), "8.5b": (40, 4096, 32), "10.1b": (48, 4096, 32), "11.7b": (56, 4096, 32),
         "13.3b": (64, 4096, 32)}


# --------------------------------------------------------------------------- the model (one coupling point)
def build_blocks(n_layer: int, n_embd: int, n_head: int, vocab: int, seq: int) -> nn.Sequential:
    """The GPT as ``[embed, layer 0..L-1, head]`` blocks with parameters on the meta device.

    The only place this benchmark touches the model: ``meshpar.models.gpt`` as it is (a plain module
    whose ``pipeline_blocks()`` are its own ``Embed``, ``Block`` s and ``Head``).
    """
    from meshpar.models.gpt import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=vocab, block_size=seq, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    with torch.device("meta"):
        return GPT(cfg).pipeline_blocks()


def init_value(n_layer: int):
    """GPT-2 init by name: N(0, 0.02) (residual projections / sqrt(2L)), unit norm weights, zero biases."""
    def init(name: str, t: torch.Tensor) -> None:
        with torch.no_grad():
            if ".ln_" in name or name.startswith("ln_") or ".ln_f" in name:
                t.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                t.zero_()
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                t.normal_(0.0, std)
    return init


def n_params(n_layer: int, n_embd: int, seq: int) -> int:
    C = n_embd
    per_layer = 12 * C * C + 13 * C
    return n_layer * per_layer + 2 * VOCAB * C + seq * C + 2 * C


def flops_per_token(n_layer: int, n_embd: int, seq: int) -> float:
    return 6 * n_params(n_layer, n_embd, seq) + 12 * n_layer * n_embd * seq


# --------------------------------------------------------------------------- measuring
def host_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def host_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Samples (seconds, GPU bytes allocated, host RSS bytes) every ``period`` seconds on a thread."""

    def __init__(self, period: float = 0.002, device_bytes=None):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.device_bytes = device_bytes
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        cuda = torch.cuda.is_available()
        while not self._stop.is_set():
            gpu = self.device_bytes() if self.device_bytes else (torch.cuda.memory_allocated() if cuda else 0)
            self.samples.append((time.perf_counter() - t0, gpu, host_rss()))
            time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _batch(B: int, T: int, device, step: int, vocab: int = VOCAB):
    g = torch.Generator(device="cpu").manual_seed(step)
    idx = torch.randint(0, vocab, (B, T + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


def _loss(blocks: nn.Module, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    logits = blocks(idx)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())


def _is_layer(name: str, m: nn.Module) -> bool:
    from meshpar.models.gpt import Block
    return isinstance(m, Block)


def _timed(step_fn, args, device, device_bytes=None) -> dict:
    cuda = device.type == "cuda"
    times, losses, samples = [], [], []
    for i in range(args.warmup + args.iters):
        last = i == args.warmup + args.iters - 1
        if cuda:
            torch.cuda.synchronize()
        if last:
            sampler = Sampler(device_bytes=device_bytes).__enter__()
        t0 = time.perf_counter()
        loss = step_fn(i)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if last:
            sampler.__exit__()
            samples = sampler.samples
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
        if i == 0 and cuda:
            torch.cuda.reset_peak_memory_stats()
    return {"step_s": statistics.median(times), "times": times, "losses": losses, "samples": samples}


# --------------------------------------------------------------------------- one run
def run_meshpar(args) -> dict:
    L, C, H = SIZES[args.size]
    smoke = args.smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    blocks = build_blocks(L, C, H, args.vocab, args.seq)
    mm.checkpoint_activations(blocks, "block", blocks=_is_layer)
    kw = dict(memory=args.memory, lr=args.lr, weight_decay=0.0, init=init_value(L))
    if smoke:
        # a simulated device holding about half of the parameter chunks: chunks move every step
        per_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        total = sum(p.numel() for p in blocks.parameters())
        kw.update(device="simulated", device_budget=max(2 * per_block, total // 2) * 4, compute_dtype=torch.float32,
                  chunk_numel=per_block)
    else:
        kw.update(device="cuda", compute_dtype=torch.bfloat16, master_dtype=torch.float32)
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    off = mm.offload(blocks, units=list(blocks), **kw)
    build_s = time.perf_counter() - t0

    def step(i):
        idx, tgt = _batch(args.batch, args.seq, device, i, args.vocab)
        loss = _loss(blocks, idx, tgt)
        loss.backward()
        off.step()
        return loss.detach()

    # smoke: the simulated device's bytes in use (parameter chunks + optimizer-state chunks)
    sim = (lambda: off.mgr.used + off.os_device_bytes) if smoke else None
    res = _timed(step, args, device, sim)
    res["build_s"] = build_s
    res["report"] = str(mm.report(off))
    res["placement"] = {"optimizer_state_on_device": sum(st.location == "device" for st in off.states),
                        "chunks": len(off.states), "chunk_numel": off.chunk_numel,
                        "param_budget_bytes": off.mgr.budget, "moves": dict(off.mgr.stats)}
    if smoke:
        res["master"] = {n: t.tolist()[:4] for n, t in list(off.master_params().items())[:3]}
    off.close()
    return res


def run_torch_dense(args) -> dict:
    """Smoke reference: the same model, plain fp32 parameters and torch AdamW on the CPU."""
    L, C, H = SIZES[args.size]
    blocks = build_blocks(L, C, H, args.vocab, args.seq)
    from meshpar.pipeline import materialize
    init = init_value(L)
    master_dtype = torch.float32
    materialize(blocks, "cpu", init=lambda n, t: init(n, t))
    blocks.to(master_dtype)
    opt = torch.optim.AdamW(blocks.parameters(), lr=args.lr, weight_decay=0.0)

    def step(i):
        idx, tgt = _batch(args.batch, args.seq, torch.device("cpu"), i, args.vocab)
        opt.zero_grad()
        loss = _loss(blocks, idx, tgt)
        loss.backward()
        opt.step()
        return loss.detach()
    return _timed(step, args, torch.device("cpu"))


def run_check(args) -> dict:
    """GPU correctness of the CUDA path (streams, pinned buffers, CPU steps on the worker thread):
    a small GPT in fp32 with a chunk budget that forces movement, against torch AdamW on the GPU."""
    from meshpar.memory.device import CudaDevice, SimulatedDevice
    from meshpar.pipeline import materialize
    L, C, H = SIZES["tiny"]
    vocab, seq, B, steps = 512, 64, 4, 4
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")   # CPU: the script's own logic only
    base_init = init_value(L)

    def seeded(name, t):          # the same init values on both sides: seeded per parameter name
        torch.manual_seed(zlib.crc32(name.encode()))
        base_init(name, t)

    def ref():
        blocks = build_blocks(L, C, H, vocab, seq)
        materialize(blocks, dev, init=seeded)
        opt = torch.optim.AdamW(blocks.parameters(), lr=1e-2, weight_decay=0.0)
        out = []
        for i in range(steps):
            idx, tgt = _batch(B, seq, dev, i, vocab)
            opt.zero_grad()
            loss = _loss(blocks, idx, tgt)
            loss.backward()
            opt.step()
            out.append(float(loss.detach()))
        return out, {n: p.detach().cpu() for n, p in blocks.named_parameters()}

    want_losses, want = ref()
    rows = []
    per_block = None
    for memory, frac in (("host", 0.34), ("auto", 2.2), ("device", 5.0)):   # capacity in parameter bytes
        blocks = build_blocks(L, C, H, vocab, seq)
        mm.checkpoint_activations(blocks, "block", blocks=_is_layer)
        per_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        total = sum(p.numel() for p in blocks.parameters())
        cap = int(max(2 * per_block * 4, frac * total * 4))
        device = CudaDevice(capacity=cap, reserve=0, track_nonmodel=False) if cuda else SimulatedDevice(cap)
        off = mm.offload(blocks, units=list(blocks), memory=memory, lr=1e-2, weight_decay=0.0, init=seeded,
                         device=device, margin=0,
                         compute_dtype=torch.float32, chunk_numel=per_block)
        losses = []
        for i in range(steps):
            idx, tgt = _batch(B, seq, dev, i, vocab)
            loss = _loss(blocks, idx, tgt)
            loss.backward()
            off.step()
            losses.append(float(loss))
        got = off.master_params()
        # attn.k.bias has an exactly-zero gradient (softmax ignores a per-query constant): Adam turns its
        # rounding noise into full-size steps of either sign, so it is left out of the comparison
        errs = {n: float((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-12)) for n in want
                if not n.endswith("attn.k.bias")}
        err = max(errs.values())
        dl = max(abs(a - b) for a, b in zip(losses, want_losses))
        rows.append({"memory": memory, "capacity": cap, "max_rel_param_err": err, "max_loss_diff": dl,
                     "moves": dict(off.mgr.stats),
                     "os_on_device": sum(st.location == "device" for st in off.states), "chunks": len(off.states)})
        off.close()
    ok = all(r["max_rel_param_err"] < 1e-3 and r["max_loss_diff"] < 1e-3 for r in rows)
    return {"check": rows, "ok": ok, "step_s": 1.0, "times": [], "losses": want_losses, "samples": []}


def run_fsdp2(args) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from meshpar.pipeline import materialize
    L, C, H = SIZES[args.size]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    blocks = build_blocks(L, C, H, args.vocab, args.seq)
    t0 = time.perf_counter()
    materialize(blocks, "cpu", init=init_value(L))          # fp32 on the host
    mm.checkpoint_activations(blocks, "block", blocks=_is_layer)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    off = CPUOffloadPolicy(pin_memory=True)
    for b in blocks:
        fully_shard(b, mp_policy=mp, offload_policy=off)
    fully_shard(blocks, mp_policy=mp, offload_policy=off)
    build_s = time.perf_counter() - t0
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats()
    try:
        state = {"opt": torch.optim.AdamW(blocks.parameters(), lr=args.lr, weight_decay=0.0, fused=True), "fused": True}
    except Exception:  # noqa: BLE001 - fused unsupported here: foreach
        state = {"opt": torch.optim.AdamW(blocks.parameters(), lr=args.lr, weight_decay=0.0, foreach=True),
                 "fused": False}

    def step(i):
        idx, tgt = _batch(args.batch, args.seq, device, i, args.vocab)
        loss = _loss(blocks, idx, tgt)
        loss.backward()
        try:
            state["opt"].step()
        except Exception:  # noqa: BLE001 - fused CPU AdamW on DTensor unsupported: foreach
            if not state["fused"]:
                raise
            state["opt"] = torch.optim.AdamW(blocks.parameters(), lr=args.lr, weight_decay=0.0, foreach=True)
            state["fused"] = False
            state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)
        return loss.detach()

    res = _timed(step, args, device)
    res["build_s"] = build_s
    res["fused_adamw"] = state["fused"]
    dist.destroy_process_group()
    return res


def run_one(args) -> dict:
    torch.manual_seed(0)
    fn = {"meshpar": run_meshpar, "fsdp2": run_fsdp2, "torch": run_torch_dense, "check": run_check}[args.run]
    L, C, H = SIZES[args.size]
    res = fn(args)
    tok = args.batch * args.seq
    res.update(mode=args.run, size=args.size, n_layer=L, n_embd=C, params=n_params(L, C, args.seq),
               tok_s=tok / res["step_s"], mfu=flops_per_token(L, C, args.seq) * tok / res["step_s"] / PEAK_BF16,
               peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
               peak_host_bytes=host_peak(), batch=args.batch, seq=args.seq)
    if torch.cuda.is_available():
        res["device"] = torch.cuda.get_device_name(0)
        res["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return res


# --------------------------------------------------------------------------- driver
def child(mode: str, size: str, args, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--run", mode, "--size", size, "--batch", str(args.batch),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--iters", str(args.iters), "--memory", args.memory,
           "--lr", str(args.lr)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ)
    if mode == "meshpar" and args.alloc_conf and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # chunks of hundreds of MB come and go between activations: without expandable segments the caching
        # allocator fragments (2026-12-08, H100, 8.5B at batch 16: a 6.14 GiB request failed with 6.1 GiB
        # reserved but unallocated)
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.alloc_conf
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "size": size, "error": f"timeout after {timeout:.0f}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stdout + p.stderr).strip().splitlines()[-6:]
    err = "out of memory" if "out of memory" in (p.stdout + p.stderr).lower() else "failed"
    return {"mode": mode, "size": size, "error": err, "tail": tail, "rc": p.returncode,
            "wall_s": time.perf_counter() - t0}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in results if r.get("samples")]
    if not runs:
        return
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=False)
    for r in runs:
        t = [s[0] for s in r["samples"]]
        a.plot(t, [s[1] / 2 ** 30 for s in r["samples"]], label=f"{r['mode']} {r['size']}")
        b.plot(t, [s[2] / 2 ** 30 for s in r["samples"]], label=f"{r['mode']} {r['size']}")
    a.set_ylabel("GPU allocated (GiB)")
    b.set_ylabel("host RSS (GiB)")
    b.set_xlabel("seconds into one training step")
    a.legend(fontsize=7)
    a.set_title("memory over one step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def driver(args) -> list[dict]:
    results = []
    if not args.smoke and not args.no_check:
        r = child("check", "tiny", args, 300)
        print("check (CUDA path vs torch AdamW, fp32, chunks forced to move):",
              "OK" if r.get("ok") else "FAILED", json.dumps(r.get("check", r)), flush=True)
        if not r.get("ok"):
            raise SystemExit("the CUDA-path correctness check failed; not timing")
    for size in args.sizes:
        for mode in args.modes:
            r = child(mode, size, args, args.timeout)
            results.append(r)
            print(_row(r), flush=True)
    for size in args.largest:       # ascending: stop at the first size that does not train
        r = child("meshpar", size, args, args.timeout)
        r["largest_probe"] = True
        results.append(r)
        print(_row(r), flush=True)
        if "error" in r:
            break
    return results


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']:>8} {r['size']:>6}  {r['error']}"
    gib = 2 ** 30
    return (f"{r['mode']:>8} {r['size']:>6}  {r['params'] / 1e9:6.2f}B  {r['tok_s']:9.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
            f"GPU {r['peak_gpu_bytes'] / gib:6.1f} GiB  host {r['peak_host_bytes'] / gib:6.1f} GiB  "
            f"step {r['step_s']:.3f}s")


def summary(results: list[dict]) -> list[str]:
    lines = []
    by = {(r["mode"], r["size"]): r for r in results if "error" not in r}
    for size in {r["size"] for r in results}:
        a, b = by.get(("meshpar", size)), by.get(("fsdp2", size))
        if a and b:
            lines.append(f"{size}: meshpar / FSDP2-offload tok/s = {a['tok_s'] / b['tok_s']:.2f}x")
    ok = [r for r in results if r.get("mode") == "meshpar" and "error" not in r]
    if ok:
        big = max(ok, key=lambda r: r["params"])
        lines.append(f"largest meshpar GPT that trained: {big['size']} ({big['params'] / 1e9:.2f}B) at "
                     f"{big['tok_s']:.0f} tok/s, MFU {100 * big['mfu']:.1f}%")
    return lines


def main() -> None:
    ap = base_parser(__doc__, smoke_help="CPU: tiny GPT on a simulated device budget")
    ap.add_argument("--run", choices=["meshpar", "fsdp2", "torch", "check"], help="one run in this process")
    ap.add_argument("--no-check", action="store_true", help="skip the GPU correctness check before timing")
    ap.add_argument("--size", default="2.78b", choices=sorted(SIZES))
    ap.add_argument("--sizes", default="2.78b,4.85b")
    ap.add_argument("--modes", default="meshpar,fsdp2")
    ap.add_argument("--largest", default="", help="meshpar sizes to try in ascending order, e.g. 8.5b,10.1b,11.7b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--memory", default="auto", choices=["auto", "host", "device"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=480.0, help="seconds per size/mode subprocess")
    ap.add_argument("--alloc-conf", default="expandable_segments:True",
                    help="PYTORCH_CUDA_ALLOC_CONF for the meshpar runs when the environment sets none ('' for none)")
    args = ap.parse_args()
    args.out = str(results_dir(args.out))
    args.vocab = 128 if args.smoke else VOCAB
    if args.smoke:
        args.seq, args.batch, args.warmup, args.iters = min(args.seq, 32), min(args.batch, 4), 1, 2
        if args.run is None:
            args.size, args.sizes, args.modes, args.largest = "tiny", "tiny", "meshpar,torch", ""
    if args.run:
        res = run_one(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    args.largest = [s for s in args.largest.split(",") if s]
    results = driver(args)
    lines = summary(results)
    if args.smoke:
        by = {r["mode"]: r for r in results if "error" not in r}
        if "meshpar" in by and "torch" in by:
            d = max(abs(a - b) for a, b in zip(by["meshpar"]["losses"], by["torch"]["losses"]))
            lines.append(f"smoke: max |loss(meshpar) - loss(torch AdamW)| over {len(by['torch']['losses'])} steps = {d:.2e}")
            lines.append(f"smoke: chunk moves {by['meshpar']['placement']['moves']}")
            if d > 1e-4:
                raise SystemExit("smoke: meshpar's losses differ from torch AdamW's")
    os.makedirs(args.out, exist_ok=True)
    tag = "smoke" if args.smoke else (torch.cuda.get_device_name(0).replace(" ", "-").lower()
                                       if torch.cuda.is_available() else "cpu")
    stamp = datetime.date.today().isoformat()
    what = "_".join(args.sizes + [f"max{s}" for s in args.largest]) or "none"
    path = os.path.join(args.out, f"offload-{tag}-{stamp}-{what}.json")
    with open(path, "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "samples"} for r in results], f, indent=1)
    png = os.path.join(args.out, f"offload-memory-{tag}-{stamp}-{what}.png")
    plot(results, png)
    print("\n".join(["", *[_row(r) for r in results], *lines, f"results: {path}", f"plot: {png}"]))


if __name__ == "__main__":
    main()
