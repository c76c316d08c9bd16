"""Benchmark `soup uniform` against the read limit, the compute limit, naive torch and mergekit.

    python benchmarks/bench_merge.py             # full grid (takes ~40 min on 2 cores)
    python benchmarks/bench_merge.py --quick     # 25M, N=2,4, fp32+bf16, 1 repetition
    python benchmarks/bench_merge.py --sizes 110M --ns 16 --dtypes fp32 --profile

Every method runs in a fresh process over the same warm-cache inputs, repetitions are
interleaved across methods, and the median is reported. Results go to
``benchmarks/results/bench.{json,md,png}`` (``--quick`` writes under ``.cache/quick``).
See benchmarks/README.md for what each method is and how to read the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_inputs  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
import runners  # noqa: E402

ALL_METHODS = ["cat", "memmap", "naive", "mergekit", "soup"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", help="from " + ",".join(make_inputs.SIZES) + " [25M,110M,440M]")
    p.add_argument("--ns", help="numbers of checkpoints to merge [2,4,8,16]")
    p.add_argument("--dtypes", help="fp32, bf16, fp16 [fp32,bf16]")
    p.add_argument("--reps", type=int, help="repetitions per method, median reported [3]")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument(
        "--quick",
        action="store_true",
        help="defaults become 25M, N=2,4, fp32+bf16, 1 rep (explicit flags win)",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--soup", default=None, help="soup executable (default: on PATH)")
    p.add_argument(
        "--snapshot",
        default="HEAD",
        help="git ref whose src/ soup runs from, frozen for the whole run ('' = the live "
        "work tree through the installed console script)",
    )
    p.add_argument("--mergekit-venv", type=Path, default=HERE / ".venv-mergekit")
    p.add_argument(
        "--max-cache-frac",
        type=float,
        default=0.62,
        help="skip a configuration whose inputs exceed this fraction of RAM: they would "
        "not stay in the page cache, and a warm-cache benchmark would measure the disk",
    )
    p.add_argument(
        "--max-naive-frac",
        type=float,
        default=0.35,
        help="skip the naive method when the inputs exceed this fraction of RAM",
    )
    p.add_argument("--no-startup", action="store_true", help="skip the start-up timings")
    p.add_argument("--profile", action="store_true", help="py-spy `soup uniform` afterwards")
    p.add_argument("--profile-config", default="110M,fp32,16", help="SIZE,DTYPE,N to profile")
    p.add_argument(
        "--greedy-config",
        default=None,
        help="SIZE,DTYPE,N for greedy step vs re-average [110M,fp32,16; --quick: 25M,fp32,4; "
        "'' to skip]",
    )
    p.add_argument(
        "--deadline",
        default=None,
        help="UTC HH:MM to finish by: a configuration that would not (estimated from the last "
        "one) is marked skipped; the report is still written",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    args = p.parse_args(argv)
    # 110M first: the targets are stated there, so a run cut short by --deadline has them.
    defaults = {"sizes": "110M,25M,440M", "ns": "2,4,8,16", "dtypes": "fp32,bf16", "reps": 3}
    if args.quick:
        defaults.update(sizes="25M", ns="2,4", reps=1)
    defaults["greedy_config"] = "25M,fp32,4" if args.quick else "110M,fp32,16"
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or (HERE / ".cache" / "quick" if args.quick else HERE / "results")
    return args


def meminfo(field: str = "MemTotal") -> int:
    """A /proc/meminfo field in bytes (MemAvailable counts reclaimable page cache too)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mem_total() -> int:
    return meminfo("MemTotal")


def warm(paths: list[Path]) -> float:
    """Read every input once so that all methods start from a warm page cache."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - t0


def ensure_inputs(size: str, dtype: str, n: int) -> list[Path]:
    """Generate missing copies in a subprocess (keeps torch out of the harness)."""
    dirs = [make_inputs.model_dir(size, dtype, k) for k in range(n)]
    missing = [d for d in dirs if not (d / "model.safetensors").exists()]
    if missing:
        need = len(missing) * make_inputs.expected_bytes(size, dtype)
        free = shutil.disk_usage(HERE).free
        if need + (10 << 30) > free:
            raise SystemExit(
                f"need {need / 1e9:.1f} GB for {size} {dtype} inputs but only "
                f"{free / 1e9:.1f} GB is free; pick fewer --sizes/--ns"
            )
        cmd = [sys.executable, str(HERE / "make_inputs.py"), "--sizes", size]
        subprocess.run([*cmd, "--dtypes", dtype, "--n", str(n)], check=True)
    return dirs


def config_base(size: str, dtype: str, n: int) -> dict[str, object]:
    """The fields every result row of one configuration shares."""
    shape = make_inputs.SIZES[size]
    return {
        "size": size,
        "dtype": dtype,
        "n": n,
        "params": shape.n_params(),
        "input_bytes": n * make_inputs.expected_bytes(size, dtype),  # exact once files exist
        "largest_tensor_bytes": shape.largest_tensor_numel() * make_inputs.BYTES_PER[dtype],
    }


def run_config(
    args: argparse.Namespace,
    ctx: runners.Context,
    size: str,
    dtype: str,
    n: int,
    methods: list[str],
    first_n: bool,
) -> list[dict[str, object]]:
    """All methods × reps for one (size, dtype, N); repetitions interleave the methods."""
    base = config_base(size, dtype, n)
    in_bytes = n * make_inputs.expected_bytes(size, dtype)
    notes: dict[str, str] = {}
    fits = min(args.max_cache_frac * mem_total(), 0.85 * meminfo("MemAvailable"))
    if in_bytes > fits:  # others' processes shrink the page cache we can count on
        note = (f"skipped: {in_bytes / 1e9:.1f} GB of inputs does not fit the page cache "
                f"({fits / 1e9:.1f} GB usable now)")  # fmt: skip
        print(f"  {size} {dtype} N={n}: {note}", flush=True)
        return [{**base, "method": m, "skipped": note} for m in methods]
    dirs = ensure_inputs(size, dtype, n)
    files = [d / "model.safetensors" for d in dirs]
    in_bytes = base["input_bytes"] = sum(f.stat().st_size for f in files)
    if "naive" in methods and in_bytes > args.max_naive_frac * mem_total():
        # naive holds every input in RAM at once: past this it would evict the warm inputs
        # and could push the other users of this shared machine into the OOM killer.
        notes["naive"] = f"skipped: would hold {in_bytes / 1e9:.1f} GB in RAM"
    warm_s = warm(files)
    load = os.getloadavg()
    print(
        f"== {size} {dtype} N={n}: {in_bytes / 1e9:.2f} GB, warm {warm_s:.1f}s, load {load[0]:.2f}",
        flush=True,
    )
    runs: dict[str, list[measure.Measurement]] = {m: [] for m in methods}
    checks: dict[str, object] = {}
    for rep in range(args.reps):
        for m in methods:
            if m in notes:
                continue
            cmd, out, note = ctx.command(m, dirs, files, dtype)
            if note:
                notes[m] = note
                continue
            res = measure.run(cmd, timeout_s=args.timeout, env=ctx.env_for(m))
            if res.returncode != 0:
                notes[m] = f"failed rc={res.returncode}: {res.stderr_tail.strip()[-400:]}"
            elif rep == 0 and first_n and m in ("naive", "mergekit", "soup"):
                checks[m] = ctx.check(out, files)
            ctx.cleanup(out)
            runs[m].append(res)
            print(
                f"  rep {rep} {m:9s} {res.wall_s:7.2f}s  "
                f"{res.peak_anon_bytes / 2**20:8.0f} MiB anon  rc={res.returncode}",
                flush=True,
            )
    rows = []
    for m in methods:
        row: dict[str, object] = {**base, "method": m, "loadavg_1m": load[0]}
        good = [r for r in runs[m] if r.returncode == 0]
        if m in notes:
            row["skipped" if not good else "note"] = notes[m]
        if good:
            med = statistics.median(r.wall_s for r in good)
            row.update(
                times_s=[r.wall_s for r in good],
                median_s=med,
                gbps=in_bytes / med / 1e9,
                peak_anon_bytes=[r.peak_anon_bytes for r in good],
                median_peak_anon_bytes=statistics.median(r.peak_anon_bytes for r in good),
                median_cpu_user_s=statistics.median(r.cpu_user_s for r in good),
                median_cpu_sys_s=statistics.median(r.cpu_sys_s for r in good),
            )
        if m in checks:
            row["check"] = checks[m]
        rows.append(row)
    return rows


def make_snapshot(ref: str) -> Path:
    """Extract `src/` at git `ref` once; soup then runs from it, not from the live tree."""
    sha = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", ref],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    root = HERE / ".cache" / f"snapshot-{sha}"
    if not (root / "src" / "modelsoups" / "__init__.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(HERE.parent), "archive", sha, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    print(f"soup runs from a snapshot of {ref} = {sha}: {root / 'src'}", flush=True)
    return root / "src"


def seconds_left(deadline: str | None) -> float:
    """Seconds until HH:MM UTC today (infinite without a deadline)."""
    if not deadline:
        return float("inf")
    hh, mm = (int(x) for x in deadline.split(":"))
    now = time.gmtime()
    return (hh * 60 + mm) * 60 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)


def meta(args: argparse.Namespace, ctx: runners.Context) -> dict[str, object]:
    git = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(HERE.parent), "status", "--porcelain", "src"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return {
        "src_uncommitted": [line.strip() for line in dirty if line.strip()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "git": git,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_total_bytes": mem_total(),
        "loadavg_start": os.getloadavg(),
        "versions": ctx.versions(),
        "reps": args.reps,
        "sampler_interval_s": measure.SAMPLE_S,
    }


def side_measurements(args: argparse.Namespace, ctx: runners.Context) -> dict[str, object]:
    """Baseline memory, start-up, greedy step and profile: before the grid, so that a run cut
    short by --deadline still has them."""
    out: dict[str, object] = {"baseline": ctx.baseline(args.reps)}
    if not args.no_startup:
        out["startup"] = ctx.startup(ensure_inputs("tiny", "fp32", 2), args.reps)
        print(f"startup: {out['startup']}", flush=True)
    out["greedy"] = ctx.greedy_hook()
    if args.greedy_config:
        size, dtype, n = args.greedy_config.split(",")
        dirs = ensure_inputs(size, dtype, int(n))
        warm([d / "model.safetensors" for d in dirs])
        out["greedy"] = {**ctx.greedy(dirs), "config": args.greedy_config}
        print(f"greedy: {out['greedy']}", flush=True)
    if args.profile:
        size, dtype, n = args.profile_config.split(",")
        dirs = ensure_inputs(size, dtype, int(n))
        warm([d / "model.safetensors" for d in dirs])
        out["profile"] = ctx.profile(dirs, args.out, f"{size}-{dtype}-N{n}")
        print(f"profile: {out['profile']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    snapshot = make_snapshot(args.snapshot) if args.snapshot else None
    ctx = runners.Context(args.soup, args.mergekit_venv, HERE / ".cache" / "out", snapshot)
    results: dict[str, object] = {"meta": meta(args, ctx), "runs": []}
    results["meta"]["soup_snapshot"] = str(snapshot) if snapshot else "live work tree"  # type: ignore[index]
    print(f"versions: {results['meta']['versions']}", flush=True)  # type: ignore[index]

    def save() -> None:
        results["meta"]["loadavg_end"] = os.getloadavg()  # type: ignore[index]
        tmp = args.out / "bench.json.tmp"
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, args.out / "bench.json")
        (args.out / "bench.md").write_text(report.markdown(results))

    results.update(side_measurements(args, ctx))
    save()
    ns = [int(x) for x in args.ns.split(",")]  # in the order given: 16,8,4,2 puts targets first
    rate = 0.0  # seconds per input byte of the last configuration run
    # N before dtype: a run cut short by --deadline keeps both dtypes at the smaller N.
    for size in args.sizes.split(","):
        for n in ns:
            for dtype in args.dtypes.split(","):
                # Estimated from the last configuration, scaled by input bytes: methods are
                # roughly linear in bytes plus a fixed start-up this slightly overestimates.
                need = rate * n * make_inputs.expected_bytes(size, dtype)
                if need > seconds_left(args.deadline):
                    note = f"skipped: would not finish before --deadline {args.deadline} UTC"
                    base = config_base(size, dtype, n)
                    rows = [{**base, "method": m, "skipped": note} for m in methods]
                else:
                    t0 = time.perf_counter()
                    rows = run_config(args, ctx, size, dtype, n, methods, first_n=n == min(ns))
                    rate = (time.perf_counter() - t0) / (
                        n * make_inputs.expected_bytes(size, dtype)
                    )
                results["runs"].extend(rows)  # type: ignore[attr-defined]
                save()
    save()
    report.plot(results, args.out / "bench.png")
    print(report.markdown(results))


if __name__ == "__main__":
    main()
