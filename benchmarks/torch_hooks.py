"""Throughput of PyTorch forward hooks against plain torch eager inference.

For the repository's LeNet-5 (28x28, the bundled held-out digits tiled) and
MobileNetV2Small (96x96, random inputs), both with random weights, in eval mode
under ``torch.no_grad()``, in one process, this times

* ``plain``: the unmodified module,
* ``hooks``: the same weights with ``attach_hooks(module, ["Conv2d"])`` and the
  default options (``keep_states=True``: raw states kept in memory),
* ``hooks, keep_states=False``: counts only,
* ``pack only (no counting)``: a plain forward hook on each probed module that
  packs its output with ``engine.pack`` and drops the result: what recording
  costs besides counting (and the per-call overhead of the hooks),
* ``outputs read once (floor)``: a plain forward hook that sums each probed
  output with numpy: the least any recording costs, since a module's output
  has mostly left the caches by the time its hook runs (a pack right after a
  convolution read 19-24 GB/s on the development VM, 28-38 GB/s when repeated),

with ``torch.set_num_threads(threads)`` for all of them, after a warm-up run,
``--repeats`` times (modes interleaved, each mode first in turn, so drift hits
all of them alike). A timed run of a probed module ends as a run of the ONNX
path does: every probe flushed (buffered raw states written to its store) and
its ``state_count`` read, so the whole cost of recording is timed. It prints a
markdown table of samples/s (median) and the ratio to plain: the median over
rounds of plain's time over the mode's in the same round. The target for the
default options is a ratio >= 0.9. The same ratio of the process's CPU times
is shown too, a second view on a machine shared with other work, where wall
times swing with the load (with more than one thread, idle torch threads
spinning count as CPU time), and each mode's minor page faults per run.

The process first calls ``tensorstate_onnx.keep_freed_memory()`` (as the
command line does), so that no mode pays for memory handed back to the OS and
faulted in again. With glibc's default (``--glibc-default``) the comparison is
not fair to plain torch: interleaved with the hooked runs, whose counters and
kept states hold heap memory, plain MobileNetV2Small took 170,000-225,000
page faults a run (0.7-0.9 GB zeroed) and ran 1.5-2x slower, while the hooked
runs took none, and the hooked module looked faster than the plain one.

:func:`torch_hook_rows` returns the rows for other benchmarks to print.

Usage: ``python benchmarks/torch_hooks.py [--threads N] [--repeats 5] [--batch 32] [--glibc-default]``
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/ is in the repository, not installed

from tensorstate_onnx import demo, keep_freed_memory
from tensorstate_onnx.engine import pack
from tensorstate_onnx.torch_capture import attach_hooks, match_modules
from models.torch_models import lenet5, mobilenet_v2_small

TARGET = 0.9
LENET_SAMPLES = 1440  # the 360 held-out digits, four times
MOBILENET_SAMPLES = 256
PROBED = ["Conv2d"]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _runner(module: torch.nn.Module, x: torch.Tensor, batch: int) -> Callable[[], None]:
    """One timed run: every batch of ``x`` through ``module``; for a probed module,
    from reset states to every probe flushed and its state count read."""
    hooks = getattr(module, "efficiency_layers", [])

    def run() -> None:
        for hook in hooks:
            hook.reset_states()
        with torch.no_grad():
            for i in range(0, len(x), batch):
                module(x[i : i + batch])
        for hook in hooks:
            hook.flush()
        sum(hook.state_count for hook in hooks)

    return run


def _minor_faults() -> int:
    """Minor page faults of this process so far (memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _paired_ratio(plain: list[float], mode: list[float]) -> float:
    """The median over rounds of plain's time over the mode's in the same round: load
    that comes and goes between rounds cancels out."""
    return statistics.median(p / m for p, m in zip(plain, mode))


def _with_plain_hooks(model: torch.nn.Module, read: Callable[[torch.Tensor], object]) -> torch.nn.Module:
    """A copy of ``model`` whose probed modules hand their output to ``read`` in a plain
    forward hook: the part of recording that is not counting, or only reading the
    output once, the least any recording costs (the output has left the caches)."""
    def hook(_module, _args, output) -> None:
        read(output)

    copied = copy.deepcopy(model)
    for _, module in match_modules(copied, PROBED):
        module.register_forward_hook(hook)
    return copied


def _bench(name: str, model: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int) -> list[dict]:
    model.eval()
    modes: dict[str, torch.nn.Module] = {
        "plain": model,
        "hooks": attach_hooks(copy.deepcopy(model), PROBED),
        "hooks, keep_states=False": attach_hooks(copy.deepcopy(model), PROBED, keep_states=False),
        "pack only (no counting)": _with_plain_hooks(model, lambda output: pack(output.detach().numpy(), 1)),
        "outputs read once (floor)": _with_plain_hooks(model, lambda output: output.detach().numpy().sum()),
    }
    runs = {mode: _runner(module, x, batch) for mode, module in modes.items()}
    names = list(modes)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
    faults: dict[str, list[int]] = {mode: [] for mode in modes}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for mode in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each mode first in turn
            start, cpu_start, faults_start = time.perf_counter(), time.process_time(), _minor_faults()
            runs[mode]()
            if round_:
                times[mode].append(time.perf_counter() - start)
                cpu_times[mode].append(time.process_time() - cpu_start)
                faults[mode].append(_minor_faults() - faults_start)
    hooks = modes["hooks"].efficiency_layers
    rows = []
    for mode, values in times.items():
        rows.append({
            "network": name, "mode": mode, "rate": len(x) / statistics.median(values),
            "ratio": _paired_ratio(times["plain"], values), "cpu_ratio": _paired_ratio(cpu_times["plain"], cpu_times[mode]),
            "spread": (len(x) / max(values), len(x) / min(values)), "samples": len(x),
            "probes": len(hooks), "states": sum(hook.state_count for hook in hooks) / len(x),
            "faults": statistics.median(faults[mode]),
        })  # fmt: skip
    return rows


def torch_hook_rows(threads: int, repeats: int, batch: int) -> list[dict]:
    """Time plain torch against hooked modules (see the module docstring); one row per
    network and mode: ``network``, ``mode``, ``rate`` (samples/s, median), ``ratio``
    (to plain, the median of the rounds' ratios), ``spread`` (slowest and fastest run's samples/s), ``samples``,
    ``probes``, ``states`` (recorded per sample), ``cpu_ratio`` (the same for
    the process's CPU time) and ``faults`` (minor page faults per run, median)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    digits = demo.load_test_data()[0]
    lenet_x = torch.from_numpy(np.resize(digits, (LENET_SAMPLES, *digits.shape[1:])).astype(np.float32))
    mobile_x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((MOBILENET_SAMPLES, 3, 96, 96), dtype=np.float32)
    )
    rows = _bench("LeNet-5 (28x28)", lenet5(), lenet_x, batch, repeats)
    rows += _bench("MobileNetV2Small (96x96)", mobilenet_v2_small(), mobile_x, batch, repeats)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=_cpu_count(), help="torch intra-op threads (every mode)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode (median is reported)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's default (freed memory handed back), instead of keep_freed_memory()")
    args = parser.parse_args(argv)

    kept = False if args.glibc_default else keep_freed_memory()
    rows = torch_hook_rows(args.threads, args.repeats, args.batch)
    print(f"{platform.processor() or platform.machine()}, {_cpu_count()} CPUs available, "
          f"batch {args.batch}, median of {args.repeats} runs after a warm-up; "
          f"freed memory {'kept (keep_freed_memory)' if kept else 'handed back (glibc default)'}")
    print()
    print_rows(rows, args.threads)


def print_rows(rows: list[dict], threads: int) -> None:
    """Print :func:`torch_hook_rows`' rows as a markdown table and the verdicts."""
    print(f"Native PyTorch hooks (torch {torch.__version__}, {threads} intra-op threads, eval mode, no_grad):")
    print()
    print("| network | mode | probes | samples | samples/s (median) | min..max | x plain | x plain, CPU time "
          "| page faults a run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        low, high = row["spread"]
        probes = "-" if row["mode"] == "plain" else row["probes"]
        print(f"| {row['network']} | {row['mode']} | {probes} | {row['samples']} | {row['rate']:,.0f} | "
              f"{low:,.0f}..{high:,.0f} | {row['ratio']:.2f} | {row['cpu_ratio']:.2f} | {row['faults']:,.0f} |")
    print()
    for row in rows:
        if row["mode"] == "hooks":
            verdict = "meets" if row["ratio"] >= TARGET else "misses"
            floor = next(r for r in rows if r["network"] == row["network"] and r["mode"].endswith("(floor)"))
            print(f"- {row['network']}: default hooks at {row['ratio']:.2f}x plain ({verdict} the {TARGET}x "
                  f"target; {row['cpu_ratio']:.2f}x in CPU time); {row['states']:,.0f} states per sample; "
                  f"reading each probed output once costs {1 / floor['ratio'] - 1:.0%} of plain (the floor)")


if __name__ == "__main__":
    main()
