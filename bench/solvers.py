"""deqctl vs TorchDEQ 0.1.0: solver speed, overhead, train step and memory (issue 3).

    python bench/solvers.py              # batch 32, 3 interleaved repeats (CPU: ~20 min)
    python bench/solvers.py --quick      # batch 4, 1 repeat: a smoke run (< 1 min)
    python bench/solvers.py --repeats 5 --device cuda

Both libraries run the same DEQ-ResNet cell (bench/_cell.py) on the same u and z0. Repeats
are interleaved in one process (the library that goes first alternates) and ratios are the
median of per-repeat deqctl/TorchDEQ ratios, so load from other processes hits both sides.
Needs the `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cell import CHANNELS, INNER, LAM, M, MAX_ITER, SIZE, TOL, TOL_FP, make_problem  # noqa: E402
from _memory import peak_growth_mb  # noqa: E402
from _timing import Timed, progress, sync, time_f_alone  # noqa: E402

try:
    from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter
except ImportError:  # pragma: no cover - the bench extra is missing
    sys.exit("bench/solvers.py needs TorchDEQ: pip install -e '.[bench]'")

from _train_step import (BF16_UNTIL, CONFIGS, GRAD_COS, bench_train, config_label,  # noqa: E402
                         make_deqs, train_step)
from deqctl.solvers import solve  # noqa: E402

MEM_ITERS, UNROLL_DEPTH = (10, 60), 30
# Memory runs must really take max_iter forward steps, so the tolerance is out of reach; the
# backward's memory does not depend on its iteration count, so it is capped to save time.
MEM_FWD_TOL, MEM_BWD_MAX_ITER = 1e-12, 10

TARGETS_OVERHEAD = {"fixed_point": 1.10, "anderson": 1.20, "broyden": 1.20}
TARGETS_RATIO = {"fixed_point": 0.95, "anderson": 0.80, "broyden": 0.50}
TARGET_TRAIN, TARGET_MEM_FLAT, TARGET_MEM_UNROLL = 0.60, 1.05, 0.50


# ---------------------------------------------------------------------------- residuals


def worst_rel_residual(f, z: torch.Tensor) -> float:
    """max over samples of ||f(z) - z|| / ||f(z)||, computed here, not taken from a library."""
    with torch.no_grad():
        fz = f(z).flatten(1).double()
        zz = z.flatten(1).double()
        return float(((fz - zz).norm(dim=1) / (fz.norm(dim=1) + 1e-12)).max())


# ---------------------------------------------------------------------------- solvers

# One group per solver: TorchDEQ's run and the deqctl variant(s) it is compared with,
# (label, tol, TorchDEQ solver, its kwargs, [(deqctl row label, method, knobs), ...]).
SOLVER_GROUPS = [
    ("fixed_point", TOL_FP, fixed_point_iter, {"tau": 1.0},
     [("fixed_point", "fixed_point", {"damping": 1.0})]),
    ("anderson", TOL, anderson_solver, {"m": M, "lam": LAM, "tau": 1.0},
     [("anderson", "anderson", {"m": M, "lam": LAM, "beta": 1.0})]),
    # TorchDEQ's Broyden keeps the full history by default (LBFGS_thres=None -> max_iter):
    # deqctl runs its default limited history, and history = max_iter like for like.
    ("broyden", TOL, broyden_solver, {},
     [("broyden h=8", "broyden", {"history": 8}),
      (f"broyden h={MAX_ITER}", "broyden", {"history": MAX_ITER})]),
]


@dataclass
class Runs:
    nfe: list[int] = field(default_factory=list)
    res: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    in_f: list[float] = field(default_factory=list)

    def add(self, nfe, res, wall, in_f):
        self.nfe.append(nfe), self.res.append(res), self.wall.append(wall), self.in_f.append(in_f)

    @property
    def overheads(self) -> list[float]:
        return [w / t for w, t in zip(self.wall, self.in_f)]


def run_solver(lib: str, method: str, knobs: dict, tol: float, f, z0, device: str,
               t_f: float):
    """One timed solve; returns (nfe, worst rel residual, wall s, seconds inside f).
    lib "deqctl": method is a deqctl solver name; "torchdeq": method is a TorchDEQ solver."""
    tf = Timed(f, clock=device == "cpu")
    gc.collect()
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        if lib == "deqctl":
            z = solve(tf, z0, method, tol=tol, max_iter=MAX_ITER, stop_mode="rel", **knobs).z
        else:
            z, _, _ = method(tf, z0, max_iter=MAX_ITER, tol=tol, stop_mode="rel", **knobs)
    sync(device)
    wall = time.perf_counter() - t
    in_f = tf.time if device == "cpu" else tf.calls * t_f
    return tf.calls, worst_rel_residual(f, z), wall, in_f


def bench_solvers(cell, u, z0, device: str, repeats: int, t_f: float, warmup: bool = True):
    """Returns {group label: {"torchdeq": Runs, deqctl row label: Runs, ...}}."""
    f = lambda z: cell(z, u)  # noqa: E731
    out = {g[0]: {"torchdeq": Runs(), **{v[0]: Runs() for v in g[4]}} for g in SOLVER_GROUPS}
    for rep in range(-1 if warmup else 0, repeats):
        for label, tol, td_solver, td_kwargs, variants in SOLVER_GROUPS:
            jobs = [("torchdeq", "torchdeq", td_solver, td_kwargs)]
            jobs += [(name, "deqctl", method, knobs) for name, method, knobs in variants]
            for name, lib, method, knobs in (jobs if rep % 2 else jobs[::-1]):
                # The warm-up pass (rep -1) stops at once: first-call costs, no measurement.
                r = run_solver(lib, method, knobs, 1.0 if rep < 0 else tol, f, z0, device, t_f)
                if rep >= 0:
                    out[label][name].add(*r)
        progress("warm-up done" if rep < 0 else f"solver repeat {rep + 1}/{repeats} done")
    return out


# ---------------------------------------------------------------------------- memory


def memory_child(spec: str, device: str, batch: int) -> None:
    """Run one train step in this fresh process and print its peak memory growth as JSON."""
    lib, iters = spec.split(":")
    iters = int(iters)
    cell, u, z0, target = make_problem(batch, device)
    ours, theirs = make_deqs(iters, MEM_FWD_TOL, MEM_BWD_MAX_ITER)
    # Load kernels and start autograd's machinery on a tiny batch, so the step measures the
    # step's own memory rather than one-time setup.
    cell(z0[:1].clone().requires_grad_(), u[:1]).sum().backward()
    cell.zero_grad(set_to_none=True)
    gc.collect()

    def step():
        if lib != "unrolled":
            return train_step(lib, ours if lib == "deqctl" else theirs, cell, u, z0, target)
        z = z0
        for _ in range(iters):
            z = cell(z, u)
        (z * target).mean().backward()
        return iters, 0

    growth, how, calls = peak_growth_mb(step, device)
    print(json.dumps({"spec": spec, "mb": growth, "how": how, "calls": calls}))


def bench_memory(device: str, batch: int, threads: int, runs: int) -> dict[str, list[dict]]:
    """Each configuration `runs` times, each in its own fresh interpreter, two at a time
    (a process's peak RSS is its own, so running side by side does not change it).

    Several runs because peak RSS of one process is noisy here: the same TorchDEQ step has
    measured anywhere from 180 to 450 MB, depending on how the allocator's heap fragments.
    """
    from concurrent.futures import ThreadPoolExecutor

    specs = [f"deqctl:{n}" for n in MEM_ITERS] + [f"torchdeq:{n}" for n in MEM_ITERS]
    specs.append(f"unrolled:{UNROLL_DEPTH}")

    def one(spec: str) -> dict:
        cmd = [sys.executable, __file__, "--_mem", spec, "--device", device,
               "--batch", str(batch), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory run {spec} failed:\n{proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        progress(f"memory {spec}: {out['mb']:.0f} MB")
        return out

    jobs = [spec for _ in range(runs) for spec in specs]
    with ThreadPoolExecutor(1 if device == "cuda" else 2) as pool:
        results = list(pool.map(one, jobs))
    return {spec: [r for r in results if r["spec"] == spec] for spec in specs}


# ---------------------------------------------------------------------------- report


def _row(name: str, lib: str, r: "Runs", ratio: str) -> str:
    return (f"{name:<13}{lib:<10}{med(r.nfe):>5.0f}{max(r.res):>15.2e}{med(r.wall):>9.2f}"
            f"{med(r.in_f):>9.2f}{med(r.overheads):>10.2f}{ratio:>8}")


def med(xs):
    return statistics.median(xs)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args, t_f, solver_runs, train, mem, elapsed, load0) -> None:
    print(f"deqctl {_version('deqctl')} vs TorchDEQ {_version('torchdeq')} (torch "
          f"{torch.__version__}), device {args.device}, {torch.get_num_threads()} threads, "
          f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"cell: DEQ-ResNet {CHANNELS}->{INNER}->{CHANNELS}, GroupNorm, {SIZE}x{SIZE}, conv "
          f"weights N(0, 0.02); batch {args.batch}; one f call alone: {t_f * 1e3:.1f} ms")
    checks = []
    if solver_runs:
        print(f"solve: rel tol {TOL:g} ({TOL_FP:g} fixed point), max_iter {MAX_ITER}, Anderson m={M} "
              f"lam={LAM:g} (TorchDEQ: absolute; deqctl: relative to the mean Gram diagonal), "
              f"beta=tau=1")
        print(f"{args.repeats} interleaved repeats, medians; ratio = median per-repeat "
              f"deqctl/TorchDEQ wall time; residual = max_b ||f(z)-z||/||f(z)|| on the returned z\n")
        hdr = f"{'solver':<13}{'library':<10}{'NFE':>5}{'worst rel res':>15}{'wall s':>9}" \
              f"{'in f s':>9}{'overhead':>10}{'ratio':>8}"
        print(hdr)
        print("-" * len(hdr))
        for label, tol, _, _, variants in SOLVER_GROUPS:
            group = solver_runs[label]
            td = group["torchdeq"]
            for name, _, _ in variants:
                r = group[name]
                ratio = med([x / y for x, y in zip(r.wall, td.wall)])
                print(_row(name, "deqctl", r, f"{ratio:.2f}"))
                base = name.split()[0]
                res_ok = max(r.res) <= max(tol * 1.001, max(td.res))
                checks.append((f"{name}: overhead <= {TARGETS_OVERHEAD[base]:.2f}",
                               f"{med(r.overheads):.2f}", med(r.overheads) <= TARGETS_OVERHEAD[base]))
                checks.append((f"{name}: wall <= {TARGETS_RATIO[base]:.2f}x TorchDEQ, residual "
                               f"<= max(tol, TorchDEQ's)",
                               f"{ratio:.2f}x, {max(r.res):.1e} vs {max(td.res):.1e}",
                               ratio <= TARGETS_RATIO[base] and res_ok))
            print(_row("", "torchdeq", td, ""))
    if train:
        print(f"\ntrain step at equal gradient accuracy (forward to rel tol {TOL:g} within "
              f"{MAX_ITER}, Anderson m={M}; cos = cosine of the weight gradient against the "
              f"exact implicit gradient; s: one step, the best of three where cos >= {GRAD_COS}; '-': no such option;\n"
              f"  anderson+bf16: deqctl's mixed-precision forward, f in bf16 until every residual is "
              f"below {BF16_UNTIL:g}, then fp32; TorchDEQ has none: its whole step under bf16 autocast):")
        print(f"  {'forward / backward':<36}{'deqctl s':>9}{'f/vjp':>9}{'cos':>10}"
              f"{'TorchDEQ s':>12}{'f/vjp':>9}{'cos':>10}")
        for config in CONFIGS:
            cells = []
            for lib, w in (("deqctl", 9), ("torchdeq", 12)):
                r = train["tried"][lib].get(config)
                cells.append(f"{'-':>{w + 19}}" if r is None else
                             f"{r['wall']:>{w}.2f}{'%d/%d' % r['calls']:>9}{r['cos']:>10.5f}")
            print(f"  {config_label(config):<36}" + "".join(cells))
        if train["chosen"] is None:
            checks.append((f"train step <= {TARGET_TRAIN:.2f}x TorchDEQ at cos >= {GRAD_COS}",
                           "no accurate backward", False))
        else:
            c, w = train["chosen"], train["walls"]
            print(f"  fastest with cos >= {GRAD_COS}: deqctl {config_label(c['deqctl'])} "
                  f"{med(w['deqctl']):.2f} s, TorchDEQ {config_label(c['torchdeq'])} "
                  f"{med(w['torchdeq']):.2f} s ({len(w['deqctl'])} interleaved repeats): "
                  f"ratio {train['ratio']:.2f}")
            checks.append((f"train step <= {TARGET_TRAIN:.2f}x TorchDEQ at cos >= {GRAD_COS}",
                           f"{train['ratio']:.2f}x", train["ratio"] <= TARGET_TRAIN))
    if mem:
        mb = {k: med([r["mb"] for r in v]) for k, v in mem.items()}

        def show(spec: str) -> str:
            vals = sorted(r["mb"] for r in mem[spec])
            spread = f" [{vals[0]:.0f}-{vals[-1]:.0f}]" if len(vals) > 1 else ""
            return f"{mb[spec]:.0f} MB{spread}"

        lo, hi = MEM_ITERS
        ours_flat = mb[f"deqctl:{hi}"] / mb[f"deqctl:{lo}"]
        theirs_flat = mb[f"torchdeq:{hi}"] / mb[f"torchdeq:{lo}"]
        vs_unrolled = mb[f"deqctl:{hi}"] / mb[f"unrolled:{UNROLL_DEPTH}"]
        runs = len(next(iter(mem.values())))
        print(f"\npeak memory growth of one train step, median of {runs} fresh process(es) "
              f"[range] ({next(iter(mem.values()))[0]['how']}; forward runs all max_iter, "
              f"backward max_iter {MEM_BWD_MAX_ITER}):")
        print(f"  deqctl IFT    @{lo}: {show(f'deqctl:{lo}')}, @{hi}: {show(f'deqctl:{hi}')} "
              f"({ours_flat:.2f}x)")
        print(f"  TorchDEQ IFT  @{lo}: {show(f'torchdeq:{lo}')}, @{hi}: {show(f'torchdeq:{hi}')} "
              f"({theirs_flat:.2f}x)")
        print(f"  unrolled depth {UNROLL_DEPTH} (backprop through every step): "
              f"{show(f'unrolled:{UNROLL_DEPTH}')}")
        checks.append((f"IFT memory @{hi} <= {TARGET_MEM_FLAT:.2f}x @{lo}", f"{ours_flat:.2f}x",
                       ours_flat <= TARGET_MEM_FLAT))
        checks.append((f"IFT memory @{hi} <= {TARGET_MEM_UNROLL:.2f}x unrolled@{UNROLL_DEPTH}",
                       f"{vs_unrolled:.2f}x", vs_unrolled <= TARGET_MEM_UNROLL))
    print("\ntargets" + (" (--quick: batch %d, indicative only; the targets are for batch 32)"
                          % args.batch if args.quick else ""))
    width = max(len(c[0]) for c in checks)
    for what, value, ok in checks:
        print(f"  {what:<{width}}  {value:>26}  {verdict(ok)}")
    misses = sum(not ok for *_, ok in checks)
    print(f"\n{len(checks) - misses}/{len(checks)} targets met; took {elapsed:.0f} s")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "(source)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="batch 4, 1 repeat (< 1 min on CPU): a smoke run, not the targets")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    p.add_argument("--train-repeats", type=int, default=None,
                   help="interleaved repeats of the two chosen train steps (default 9: one "
                        "step's time varies by +-20%% on a shared machine)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default 32 (4 with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, loaded machine a "
                        "descheduled OpenMP worker stalls every parallel op, which makes "
                        "multi-threaded timings erratic; 0 keeps torch's default)")
    p.add_argument("--mem-runs", type=int, default=None,
                   help="fresh processes per memory configuration (default 2, 1 with --quick)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-train", action="store_true", help="skip the train-step comparison")
    p.add_argument("--no-solvers", action="store_true", help="skip the solver comparison")
    p.add_argument("--_mem", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.batch = args.batch or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.train_repeats = args.train_repeats or (1 if args.quick else 9)
    args.mem_runs = args.mem_runs or (1 if args.quick else 2)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args._mem:
        return memory_child(args._mem, args.device, args.batch)

    start, load0 = time.perf_counter(), os.getloadavg()[0]
    cell, u, z0, target = make_problem(args.batch, args.device)
    t_f = time_f_alone(lambda z: cell(z, u), z0, args.device)
    solver_runs = None if args.no_solvers else bench_solvers(cell, u, z0, args.device,
                                                             args.repeats, t_f)
    train = None if args.no_train else bench_train(cell, u, z0, target, args.device,
                                                   args.train_repeats)
    mem = None if args.no_memory else bench_memory(args.device, args.batch,
                                                   torch.get_num_threads(), args.mem_runs)
    report(args, t_f, solver_runs, train, mem, time.perf_counter() - start, load0)


if __name__ == "__main__":
    main()
