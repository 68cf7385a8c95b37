"""Peak memory of a long analysis: does RSS grow with the number of samples?

Each run is a fresh subprocess that builds the MobileNetV2-style ONNX (96x96,
random weights) with every Conv output probed and no storage, streams random
samples from a generator in batches, and reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) together with the number of
distinct states the counters ended up holding. Runs on N and 10N samples are
compared; the target is a peak-RSS ratio <= 1.10. The long runs also report
the peak RSS reached after every N samples fed, which shows where it stops rising.

Counting memory grows with the number of *distinct* states by design, so two
kinds of random data are used:

* ``pool``: the generator cycles through a fixed pool of N random samples
  (regenerated from seeds, so the pool itself takes no memory). Both runs see
  the same distinct states; the 10N run sees each of them ten times as often.
  Any growth of RSS is memory held per sample (a leak) -- this is the <= 1.10
  check.
* ``iid``: every batch is fresh noise. Through random weights nearly every
  state is new, so distinct states (and the counters) grow with the samples;
  the table shows how RSS follows them.
* ``pool, tuned``: the pool run again with ``io_binding=True`` and
  ``MALLOC_MMAP_THRESHOLD_`` pinned (see ``TUNED_MMAP_THRESHOLD``): separates
  allocator behaviour from memory the analysis holds.

Peak RSS of identical runs differs by up to ~200 MiB on a shared machine
(onnxruntime's arena and the allocator), so each run is repeated
``--repeats`` times and the medians are compared.

Usage: ``python benchmarks/memory.py [--n 2000] [--iid-n 200] [--batch 100] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/ is in the repository, not installed

TARGET = 1.10
# "pool, tuned": io_binding=True (probe buffers reused, no per-batch allocation
# by onnxruntime) and glibc's mmap threshold pinned, so large arrays freed by
# the recording thread go back to the system instead of fragmenting the heap.
TUNED_MMAP_THRESHOLD = 128 << 10
SHAPE = (3, 96, 96)


def _batches(mode: str, n: int, pool: int, batch: int):
    """``n`` random samples in batches; ``pool`` mode repeats the first ``pool`` samples."""
    import numpy as np

    for k, start in enumerate(range(0, n, batch)):
        seed = k % max(1, pool // batch) if mode == "pool" else k
        rng = np.random.default_rng([12345, seed])
        yield rng.standard_normal((min(batch, n - start), *SHAPE), dtype=np.float32)


def _child(mode: str, n: int, pool: int, batch: int, tuned: bool) -> None:
    """Analyze ``n`` samples and print one JSON line of measurements."""
    from tensorstate_onnx import OnnxEfficiencyModel
    from models.onnx_models import mobilenet_v2_small_onnx

    model = OnnxEfficiencyModel(mobilenet_v2_small_onnx(), "Conv", providers="cpu", io_binding=tuned)
    peaks = {}  # samples fed so far -> peak RSS (MiB) by then, at each multiple of the pool

    def watched():
        fed = 0
        for samples in _batches(mode, n, pool, batch):
            if fed and fed % pool == 0:
                peaks[fed] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            fed += len(samples)
            yield samples

    start = time.perf_counter()
    model.predict(watched(), progress=False)
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # read before counts() allocates
    layers = model.efficiency_layers
    print(json.dumps({
        "peak_mib": peak_kib / 1024,
        "peaks": peaks,
        "seconds": elapsed,
        "probes": len(layers),
        "states": sum(layer.state_count for layer in layers),
        "distinct": sum(len(layer.counts()) for layer in layers),
    }))  # fmt: skip


def _measure(mode: str, n: int, pool: int, batch: int, tuned: bool, repeats: int) -> dict:
    """The run of median peak RSS among ``repeats`` runs, with every peak in ``"all_peaks"``."""
    runs = sorted((_measure_once(mode, n, pool, batch, tuned) for _ in range(repeats)), key=lambda r: r["peak_mib"])
    median = dict(runs[(len(runs) - 1) // 2])
    median["all_peaks"] = [r["peak_mib"] for r in runs]
    return median


def _measure_once(mode: str, n: int, pool: int, batch: int, tuned: bool) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(n), str(pool), "--batch", str(batch)]
    env = dict(os.environ)
    if tuned:
        command.append("--tuned")
        env["MALLOC_MMAP_THRESHOLD_"] = str(TUNED_MMAP_THRESHOLD)
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"child run {mode} n={n} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples of the short pool run (the long one has 10x)")
    parser.add_argument("--iid-n", type=int, default=200, help="samples of the short iid run (0 skips iid)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each size; the medians are compared")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "N", "POOL"), help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.child:
        mode, n, pool = args.child
        _child(mode, int(n), int(pool), args.batch, args.tuned)
        return

    plans = [("pool", args.n, False), ("pool, tuned", args.n, True)]
    plans += [("iid", args.iid_n, False)] if args.iid_n else []
    rows = []
    for mode, n, tuned in plans:
        data = mode.split(",")[0]
        short = _measure(data, n, n, args.batch, tuned, args.repeats)
        long = _measure(data, 10 * n, n, args.batch, tuned, args.repeats)
        rows.append((mode, n, short, long))

    print("MobileNetV2-style ONNX (96x96), every Conv probed (22 probes), no storage, "
          f"batch {args.batch}, one subprocess per run; peak RSS = ru_maxrss, median of {args.repeats} runs")
    print()
    print("| data | samples | seconds | states | distinct states | peak RSS (MiB), median | all runs | ratio 10N/N |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for mode, n, short, long in rows:
        ratio = long["peak_mib"] / short["peak_mib"]
        for size, run in ((n, short), (10 * n, long)):
            shown = f"{ratio:.3f}" if run is long else ""
            peaks = ", ".join(f"{p:,.0f}" for p in run["all_peaks"])
            print(f"| {mode} | {size:,} | {run['seconds']:.1f} | {run['states']:,} | {run['distinct']:,} | "
                  f"{run['peak_mib']:,.1f} | {peaks} | {shown} |")
    print()
    print()
    print("Peak RSS (MiB) during the median long runs, by samples fed so far (it stops rising once the "
          "counters and the allocator reach their steady state):")
    print()
    for mode, n, short, long in rows:
        if long["peaks"]:
            marks = ", ".join(f"{int(fed):,}: {peak:,.0f}" for fed, peak in long["peaks"].items())
            print(f"- {mode}: {marks}, end ({10 * n:,}): {long['peak_mib']:,.0f}")
    print()
    for mode, n, short, long in rows:
        ratio = long["peak_mib"] / short["peak_mib"]
        grown = long["peak_mib"] - short["peak_mib"]
        new_states = long["distinct"] - short["distinct"]
        if mode.startswith("pool"):
            verdict = "meets" if ratio <= TARGET else "misses"
            print(f"- {mode}: ratio {ratio:.3f} ({verdict} the <= {TARGET} target); same distinct states in both "
                  f"runs ({short['distinct']:,} vs {long['distinct']:,}), RSS grew {grown:+.1f} MiB")
        else:
            per_state = grown * 2**20 / new_states if new_states > 0 else float("nan")
            print(f"- iid: ratio {ratio:.3f}; distinct states grew {short['distinct']:,} -> {long['distinct']:,}, "
                  f"RSS {grown:+.1f} MiB, about {per_state:.0f} bytes per added distinct state "
                  "(memory follows distinct states, as designed)")


if __name__ == "__main__":
    main()
