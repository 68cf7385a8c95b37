"""Throughput of the state engine: pack, StateCounter, and a fresh process's first pack.

Prints markdown tables:

* **pack**: for C in {8, 64, 512, 4096}, float32 inputs of about ``--mib`` MiB,
  channels-last ``(N, H, W, C)`` and channels-first ``(N, C, H, W)``:
  ``pack`` GB/s, ``np.packbits(x > 0, axis=<channel axis>, bitorder="little")``
  GB/s and the read bandwidth of ``x.sum()`` GB/s, all measured in the same run,
  with the ratios pack/sum (target >= 0.8x) and pack/packbits.
* **pack, channels-first with small feature maps**: ``(N, C, H, W)`` float32
  with H*W in {1, 4, 9, 16, 64} and C in {8, 64, 512, 1280, 4096} (inputs of
  about ``--mib`` MiB), and late layers of real CNNs at batch 32
  (``(32, 1280, 3, 3)``, ``(32, 320, 3, 3)``, ``(32, 96, 6, 6)``,
  ``(32, 16, 48, 48)``, ``(32, 512, 1, 1)``; these fit in cache, and so does
  their ``x.sum()``): pack GB/s, ``x.sum()`` GB/s and pack/sum.
* **sorting keys**: ns a key of numpy's ``ndarray.sort`` and of the engine's
  radix sort (``engine.radix``) on random uint32 keys, uint64 keys with 5
  significant bytes and 64-bit ones, 4,096 to 2^20 of them (the time of
  copying the keys back in is subtracted), and which of the two the counter
  picked on this machine.
* **counting**: states/s of ``StateCounter`` (``add`` + ``result``, timed
  together) against ``np.unique(packed, axis=0, return_counts=True)`` for
  (a) about 1,000 distinct states and (b) mostly distinct random states.
  Targets: >= 10x for C <= 512, >= 4x for C = 4096. The counter is timed on all
  rows (``--rows``, a tenth of it for C = 4096), once added as one batch and
  once streamed in batches of 65,536 rows; ``np.unique`` (slow) on the first
  rows only, as many as it handles in about ``--unique-seconds``, which can
  only flatter it (its cost per row grows with the rows).
* **fresh process**: wall time of ``python -c "import tensorstate_onnx.engine
  as e, numpy as np; e.pack(np.ones((64, 8), np.float32))"`` in a subprocess,
  run twice (the first warms the numba cache), the second reported
  (target < 1 s).

Every time is the median of ``--repeats`` runs (default 5) after one warm-up.
The machine may be shared: the load average is printed before and after.

Usage: ``python benchmarks/engine.py [--mib 256] [--repeats 5] [--rows 2000000]``
(``--mib 1024`` for inputs well beyond a large reported L3).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from tensorstate_onnx.engine import StateCounter, n_bytes_for, pack
from tensorstate_onnx.engine.radix import radix_faster, radix_sort

CHANNELS = (8, 64, 512, 4096)
STREAM_BATCH = 65_536


def interleaved_medians(fns, repeats: int, min_seconds: float = 0.02) -> list[float]:
    """Median seconds per call of each of ``fns``, timed in turn within each
    repeat (so that a change of machine load hits them alike). A call is
    repeated within one timing until it takes ``min_seconds``, so that small
    inputs are not timed at the clock's resolution."""
    loops = []
    for fn in fns:
        fn()  # warm-up (numba cache load, page faults of output buffers)
        start = time.perf_counter()
        fn()
        loops.append(max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, series in zip(fns, loops, times):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            series.append((time.perf_counter() - start) / n)
    return [float(np.median(series)) for series in times]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (numba cache load, page faults of output buffers)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def mark(ok: bool) -> str:
    return "ok" if ok else "**below**"


# ------------------------------------------------------------------------- pack


def pack_shapes(channels: int, mib: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    side = 32 if channels <= 64 else 16
    n = max(1, round(mib * 2**20 / 4 / (side * side * channels)))
    return (n, side, side, channels), (n, channels, side, side)


def bench_pack(mib: float, repeats: int) -> list[str]:
    rows = [
        "| C | layout | shape | pack GB/s | packbits GB/s | sum GB/s | pack/sum (>= 0.8) | pack/packbits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(0)
    for channels in CHANNELS:
        last_shape, first_shape = pack_shapes(channels, mib)
        x_last = rng.standard_normal(last_shape, dtype=np.float32)
        for layout, axis in (("channels-last", -1), ("channels-first", 1)):
            x = x_last if axis == -1 else np.ascontiguousarray(np.moveaxis(x_last, -1, 1))
            gb = x.nbytes / 1e9
            t_pack = median_time(lambda x=x: pack(x, axis), repeats)
            t_bits = median_time(lambda x=x: np.packbits(x > 0, axis=axis, bitorder="little"), repeats)
            t_sum = median_time(x.sum, repeats)
            ratio = t_sum / t_pack
            rows.append(
                f"| {channels} | {layout} | {x.shape} | {gb / t_pack:.2f} | {gb / t_bits:.2f} | "
                f"{gb / t_sum:.2f} | {ratio:.2f}x {mark(ratio >= 0.8)} | {t_bits / t_pack:.1f}x |"
            )
            print(rows[-1], flush=True)
            del x
        del x_last
    return rows


SMALL_SIDES = ((1, 1), (2, 2), (3, 3), (4, 4), (8, 8))
SMALL_CHANNELS = (8, 64, 512, 1280, 4096)
CNN_SHAPES = ((32, 1280, 3, 3), (32, 320, 3, 3), (32, 96, 6, 6), (32, 16, 48, 48), (32, 512, 1, 1))


def small_map_shapes(mib: float) -> list[tuple[int, ...]]:
    """The channels-first shapes with small feature maps (about ``mib`` MiB
    each), then the late CNN layers at batch 32."""
    shapes = []
    for height, width in SMALL_SIDES:
        for channels in SMALL_CHANNELS:
            n = max(1, round(mib * 2**20 / 4 / (height * width * channels)))
            shapes.append((n, channels, height, width))
    return shapes + list(CNN_SHAPES)


def bench_pack_small_maps(mib: float, repeats: int) -> list[str]:
    rows = [
        "| shape (N, C, H, W) | MiB | pack GB/s | sum GB/s | pack/sum (>= 0.8) |",
        "|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(2)
    for shape in small_map_shapes(mib):
        x = rng.standard_normal(shape, dtype=np.float32)
        t_pack, t_sum = interleaved_medians([lambda x=x: pack(x, 1), x.sum], repeats)
        gb = x.nbytes / 1e9
        ratio = t_sum / t_pack
        rows.append(
            f"| {shape} | {x.nbytes / 2**20:.1f} | {gb / t_pack:.2f} | {gb / t_sum:.2f} | "
            f"{ratio:.2f}x {mark(ratio >= 0.8)} |"
        )
        print(rows[-1], flush=True)
        del x
    return rows


# --------------------------------------------------------------------- counting


def counting_data(channels: int, kind: str, n: int, rng) -> np.ndarray:
    width = n_bytes_for(channels)
    if kind == "few":
        pool = np.unique(rng.integers(0, 256, (1000, width), dtype=np.uint8), axis=0)
        return pool[rng.integers(0, pool.shape[0], n)]
    return rng.integers(0, 256, (n, width), dtype=np.uint8)


def unique_rows_within(packed: np.ndarray, seconds: float) -> int:
    """Rows of ``packed`` that np.unique handles in about ``seconds`` (estimated
    from a first call on a slice; its cost per row only grows with the rows)."""
    probe = min(packed.shape[0], 20_000)
    start = time.perf_counter()
    np.unique(packed[:probe], axis=0, return_counts=True)
    per_row = (time.perf_counter() - start) / probe
    return int(min(packed.shape[0], max(probe, seconds / per_row)))


def bench_counting(repeats: int, rows: int, unique_seconds: float) -> list[str]:
    table = [
        "| C | states | rows | distinct | counter M states/s (one add) | streamed M/s | "
        "np.unique rows | np.unique M states/s | ratio (target) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(1)
    for channels in CHANNELS:
        n = rows if channels <= 512 else max(1, rows // 10)
        target = 10 if channels <= 512 else 4
        for kind in ("few", "distinct"):
            packed = counting_data(channels, kind, n, rng)

            def count_once():
                counter = StateCounter(channels)
                counter.add(packed)
                return counter.result()

            def count_streamed():
                counter = StateCounter(channels)
                for start in range(0, n, STREAM_BATCH):
                    counter.add(packed[start : start + STREAM_BATCH])
                return counter.result()

            ids, counts = count_once()
            n_unique = unique_rows_within(packed, unique_seconds)
            sample = packed[:n_unique]
            expected = np.unique(sample, axis=0, return_counts=True)
            check = StateCounter(channels)
            check.add(sample)
            got = check.result(sort=True)
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
            assert counts.sum() == n

            t_once = median_time(count_once, repeats)
            t_stream = median_time(count_streamed, repeats)
            t_unique = median_time(lambda: np.unique(sample, axis=0, return_counts=True), repeats)
            rate_once, rate_stream, rate_unique = n / t_once, n / t_stream, n_unique / t_unique
            ratio = min(rate_once, rate_stream) / rate_unique
            if channels == 8:  # only 256 states exist
                label = "a pool of 1,000 random (<= 256)" if kind == "few" else "random"
            else:
                label = "~1,000 distinct" if kind == "few" else "random, mostly distinct"
            table.append(
                f"| {channels} | {label} | {n:,} | {ids.shape[0]:,} | {rate_once / 1e6:.2f} | "
                f"{rate_stream / 1e6:.2f} | {n_unique:,} | {rate_unique / 1e6:.3f} | "
                f"{ratio:.1f}x (>= {target}x) {mark(ratio >= target)} |"
            )
            print(table[-1], flush=True)
    return table


# ---------------------------------------------------------------- sorting keys

SORT_SIZES = (4096, 65_536, 1 << 20)


def bench_sort(repeats: int) -> list[str]:
    """numpy's sort against the radix sort on the counter's keys, and the one it picks."""
    table = [
        "| keys | n | numpy sort ns/key | radix sort ns/key | radix / numpy speed | the counter sorts with |",
        "|---|---:|---:|---:|---:|---|",
    ]
    rng = np.random.default_rng(2)
    kinds = (
        ("uint32 (states of 17-32 neurons)", np.uint32, 32),
        ("uint64, 5 significant bytes (33-40 neurons)", np.uint64, 40),
        ("uint64, 64 random bits (hash tags)", np.uint64, 64),
    )
    for label, dtype, bits in kinds:
        chosen = "radix" if radix_faster(np.dtype(dtype)) else "numpy"
        for n in SORT_SIZES:
            keys = rng.integers(0, 2**bits, n, dtype=np.uint64, endpoint=False)
            keys = (keys << np.uint64(64 - bits)) if dtype is np.uint64 else keys.astype(np.uint32)
            scratch = np.empty_like(keys)
            work = keys.copy()

            def numpy_sort():
                work[:] = keys
                work.sort()

            def radix():
                work[:] = keys
                radix_sort(work, scratch)

            def copy_only():
                work[:] = keys

            t_numpy, t_radix, t_copy = interleaved_medians([numpy_sort, radix, copy_only], repeats)
            t_numpy, t_radix = t_numpy - t_copy, t_radix - t_copy
            table.append(
                f"| {label} | {n:,} | {t_numpy / n * 1e9:.1f} | {t_radix / n * 1e9:.1f} | "
                f"{t_numpy / t_radix:.2f}x | {chosen} |"
            )
            print(table[-1], flush=True)
    return table


# ---------------------------------------------------------------- fresh process


def bench_fresh_process() -> list[str]:
    code = "import tensorstate_onnx.engine as e, numpy as np; e.pack(np.ones((64, 8), np.float32))"
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    line = (
        f"| first pack in a fresh process (import + pack) | {times[1]:.2f} s "
        f"(first run {times[0]:.2f} s) | < 1 s {mark(times[1] < 1.0)} |"
    )
    return ["| check | time | target |", "|---|---|---|", line]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=256, help="size of each pack input (MiB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--rows", type=int, default=2_000_000,
                        help="states counted for C <= 512 (a tenth of it for C = 4096)")
    parser.add_argument("--unique-seconds", type=float, default=1.0,
                        help="np.unique gets as many of the rows as it counts in about this time")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pack", "small", "sort", "count", "fresh"])
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {load()}\n")
    sections = []
    if "fresh" not in args.skip:
        sections.append(("Fresh process", bench_fresh_process()))
        print("\n".join(sections[-1][1]) + "\n", flush=True)
    if "pack" not in args.skip:
        print(f"pack, float32 inputs of about {args.mib:g} MiB, medians of {args.repeats} runs", flush=True)
        sections.append((f"pack (float32, ~{args.mib:g} MiB per input)", bench_pack(args.mib, args.repeats)))
    if "small" not in args.skip:
        print(f"\npack, channels-first small feature maps, medians of {args.repeats} runs", flush=True)
        sections.append(
            (
                f"pack, channels-first small feature maps (float32, ~{args.mib:g} MiB; CNN layers at batch 32)",
                bench_pack_small_maps(args.mib, args.repeats),
            )
        )
    if "sort" not in args.skip:
        print(f"\nsorting keys, medians of {args.repeats} runs", flush=True)
        sections.append(("Sorting keys (numpy's sort vs the radix sort)", bench_sort(args.repeats)))
    if "count" not in args.skip:
        print(f"\ncounting, medians of {args.repeats} runs", flush=True)
        sections.append(("Counting (add + result)", bench_counting(args.repeats, args.rows, args.unique_seconds)))
    print(f"\n## Results (load average at the end {load()}, {time.perf_counter() - started:.0f} s)\n")
    for title, rows in sections:
        print(f"### {title}\n")
        print("\n".join(rows) + "\n")
    if "count" not in args.skip:
        print(
            f"np.unique is timed on the first rows only, as many as it counts in about "
            f"{args.unique_seconds:g} s (its cost per row only grows with the rows, so this flatters it); "
            "the counter on all rows, added at once and streamed in batches of "
            f"{STREAM_BATCH:,}. Ratio = the slower of the counter's two modes / np.unique."
        )

if __name__ == "__main__":
    main()
