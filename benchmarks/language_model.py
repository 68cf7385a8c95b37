"""A GPT-2-small-shaped language model on the ONNX path: throughput, build cost, counter memory.

The model is GPT-2 small's shape (12 layers, 768 wide, 3,072-neuron MLPs,
vocabulary 50,257; random weights from a ``transformers`` config, nothing
downloaded), exported once with ``tensorstate_onnx.converters.from_torch`` to
``--model`` (about 500 MB) and reused. On the CPU provider this measures

* tokens/s of ``OnnxEfficiencyModel.predict(..., keep_outputs=False)`` with all
  12 MLP activations probed (``transformer.h.<i>.mlp.act``: 12 x 3,072 neurons,
  one state per token), against a plain onnxruntime session of the same file
  with the same session options (optimization "all", the same intra-op
  threads, spinning off as in the probed session); the two run interleaved,
  after a warm-up, and the median of ``--repeats`` rounds is reported;
* the time and peak RSS (``ru_maxrss``) of building the probed model against
  opening a plain session, each in a fresh subprocess (so the peak is that
  variant's alone), median of ``--build-repeats``;
* the counters' memory per distinct state after the run (``StateCounter.nbytes``
  summed over the 12 probes, divided by their distinct states).

Targets (issue 17): probed >= 0.9x plain tokens/s; build <= 2x the plain
session's time; peak RSS <= 2x the model file.

Usage: ``python benchmarks/language_model.py [--model PATH] [--sequences 4]
[--length 256] [--batch 4] [--repeats 3] [--threads N] [--build-repeats 2]``;
raise ``--sequences`` for more tokens. ``--long-run 1000000`` instead counts a
million random tokens through the probes alone (count-only), printing tokens/s,
distinct states, the counters' bytes and peak RSS as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MLP_ACTIVATIONS = [f"transformer.h.{i}.mlp.act" for i in range(12)]
VOCABULARY = 50257


def _import_transformers():
    """transformers, imported on the CPU torch too: the PyPI torchvision it pulls in
    may ship C++ operators built for another torch, whose fake-kernel registration
    then fails; declaring their schemas lets the import finish (as tests/conftest.py does)."""
    import torch

    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import transformers

    return torch, transformers


def export_model(path: Path) -> None:
    """Export the GPT-2-small-shaped model (random weights, seed 0) to ``path``."""
    from tensorstate_onnx.converters import from_torch

    torch, transformers = _import_transformers()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
    from_torch(model, {"input_ids": torch.randint(0, VOCABULARY, (2, 16))}, path=path)


def _session_options(threads: int):
    """The options OnnxEfficiencyModel gives its session, for the plain one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def build_once(variant: str, path: Path, threads: int) -> dict:
    """Open a plain session or build the probed model; seconds and this process's peak RSS."""
    import onnxruntime as ort

    from tensorstate_onnx import OnnxEfficiencyModel

    start = time.perf_counter()
    if variant == "plain":
        ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])
    else:
        OnnxEfficiencyModel(path, MLP_ACTIVATIONS, providers="cpu", threads=threads)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _build_in_subprocess(variant: str, path: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--build-only", variant, "--model", str(path), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(path: Path, ids: np.ndarray, batch: int, threads: int, repeats: int) -> dict:
    """Tokens/s of the plain session and of the probed model (count-only), interleaved."""
    import onnxruntime as ort

    from tensorstate_onnx import OnnxEfficiencyModel

    plain = ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])
    probed = OnnxEfficiencyModel(path, MLP_ACTIVATIONS, providers="cpu", threads=threads)

    def run_plain() -> None:
        for i in range(0, len(ids), batch):
            plain.run(None, {"input_ids": ids[i : i + batch]})

    def run_probed() -> None:
        probed.predict({"input_ids": ids}, batch_size=batch, progress=False, keep_outputs=False)

    times: dict[str, list[float]] = {"plain": [], "probed": []}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for mode, run in (("plain", run_plain), ("probed", run_probed)):
            start = time.perf_counter()
            run()
            if round_:
                times[mode].append(time.perf_counter() - start)
    counters = [capture.counter for capture in probed.efficiency_layers]
    distinct = sum(counter.n_distinct for counter in counters)
    return {
        "tokens": ids.size,
        "plain": ids.size / statistics.median(times["plain"]),
        "probed": ids.size / statistics.median(times["probed"]),
        "states": sum(counter.total for counter in counters),
        "distinct": distinct,
        "counter_bytes": sum(counter.nbytes for counter in counters),
    }


def long_run(path: Path, tokens: int, length: int, batch: int, threads: int) -> None:
    """Count ``tokens`` random tokens (sequences of ``length``) through the 12 probes,
    count-only, printing progress (tokens/s, distinct states, counter memory, peak
    RSS) every ~5% and a summary line: what a million-token run costs."""
    from tensorstate_onnx import OnnxEfficiencyModel

    probed = OnnxEfficiencyModel(path, MLP_ACTIVATIONS, providers="cpu", threads=threads)
    rng = np.random.default_rng(0)
    sequences = -(-tokens // length)
    step = max(batch, sequences // 20 // batch * batch)
    start = time.perf_counter()
    done = 0
    while done < sequences:
        n = min(step, sequences - done)
        ids = rng.integers(0, VOCABULARY, (n, length), dtype=np.int64)
        probed.predict({"input_ids": ids}, batch_size=batch, progress=False, keep_outputs=False)
        done += n
        counters = [capture.counter for capture in probed.efficiency_layers]
        states = sum(counter.total for counter in counters)
        distinct = sum(counter.n_distinct for counter in counters)
        held = sum(counter.nbytes for counter in counters)
        elapsed = time.perf_counter() - start
        print(json.dumps({
            "tokens": done * length, "seconds": round(elapsed, 1), "tokens_per_s": round(done * length / elapsed, 1),
            "states": states, "distinct": distinct, "counter_bytes": held,
            "bytes_per_distinct": round(held / max(distinct, 1), 1),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }), flush=True)  # fmt: skip
    assert states == done * length * len(MLP_ACTIVATIONS), "every token of every probe counted once"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/tensorstate-gpt2-small.onnx"))
    parser.add_argument("--sequences", type=int, default=4, help="sequences per round")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per onnxruntime run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--build-only", choices=["plain", "probed"], help=argparse.SUPPRESS)
    parser.add_argument("--long-run", type=int, metavar="TOKENS",
                        help="only count this many tokens through the probes, printing progress")  # fmt: skip
    args = parser.parse_args()
    if args.build_only:
        print(json.dumps(build_once(args.build_only, args.model, args.threads)))
        return
    if not args.model.exists():
        print(f"exporting the GPT-2-small-shaped model to {args.model} ...", flush=True)
        export_model(args.model)
    if args.long_run:
        long_run(args.model, args.long_run, args.length, args.batch, args.threads)
        return
    size = args.model.stat().st_size
    builds = {
        variant: [_build_in_subprocess(variant, args.model, args.threads) for _ in range(args.build_repeats)]
        for variant in ("plain", "probed")
    }
    build = {
        variant: {key: statistics.median(run[key] for run in runs) for key in ("seconds", "peak_rss")}
        for variant, runs in builds.items()
    }
    ids = np.random.default_rng(0).integers(0, VOCABULARY, (args.sequences, args.length), dtype=np.int64)
    rates = throughput(args.model, ids, args.batch, args.threads, args.repeats)

    mb = 2**20
    print(f"# GPT-2-small shape, {size / mb:.0f} MB file; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; {args.sequences} x {args.length} tokens, batch {args.batch}, "
          f"median of {args.repeats}")  # fmt: skip
    print()
    print("| measure | plain onnxruntime | probed (12 MLP activations) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| tokens/s (count-only) | {rates['plain']:,.0f} | {rates['probed']:,.0f} | "
          f"{rates['probed'] / rates['plain']:.2f}x | >= 0.9x |")  # fmt: skip
    print(f"| build time | {build['plain']['seconds']:.2f} s | {build['probed']['seconds']:.2f} s | "
          f"{build['probed']['seconds'] / build['plain']['seconds']:.1f}x | <= 2x |")  # fmt: skip
    print(f"| peak RSS | {build['plain']['peak_rss'] / mb:,.0f} MB ({build['plain']['peak_rss'] / size:.1f}x file) | "
          f"{build['probed']['peak_rss'] / mb:,.0f} MB ({build['probed']['peak_rss'] / size:.1f}x file) | "
          f"{build['probed']['peak_rss'] / build['plain']['peak_rss']:.1f}x | <= 2x file |")  # fmt: skip
    print()
    print(f"counters: {rates['states']:,} states, {rates['distinct']:,} distinct, "
          f"{rates['counter_bytes'] / mb:.1f} MB, {rates['counter_bytes'] / max(rates['distinct'], 1):.0f} bytes "
          "per distinct 3,072-neuron state")  # fmt: skip


if __name__ == "__main__":
    main()
