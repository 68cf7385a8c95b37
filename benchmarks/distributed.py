"""Sharded analysis on Dask: one process vs 2 workers, simulated many workers, and a projection.

Every Conv of :func:`~models.onnx_models.mobilenet_v2_small_onnx` is probed
(22 probes; random weights, so nearly every state is distinct: the worst case
for a reduction) on random 3x96x96 samples read by the workers from a ``.npy``.

1. **One process vs 2 workers**: ``OnnxEfficiencyModel.predict`` with
   onnxruntime free to use every core (and, as a second baseline, the same
   followed by every probe's efficiency, which a sharded run's summaries give), against
   :func:`tensorstate_onnx.distributed.analyze_sharded` on a LocalCluster of 2
   single-threaded workers started as a run starts them (``local_cluster``), and against the same cluster with the counters
   dropped before they are split (nothing reduced: the cost of the reduction).
   Wall time, best of ``--repeats`` runs interleaved (the machine is shared);
   every run's metrics are checked against one process (every alpha).
2. **Simulated workers**: LocalClusters of 2 and ``--sim-workers`` single-
   threaded workers on this machine's cores, at ``--sim-samples`` and twice as
   many samples. Wall time means little when 8 workers share 2 cores, so
   every cost is CPU seconds: per shard task (counting and splitting), per
   partition (its merge tasks), the client process (the cluster runs in a
   process of its own) and the scheduler's process. The client's peak RSS above
   its RSS before the run is sampled every 10 ms; it must not grow with the
   distinct states.
3. **Projection** to 8, 64 and 512 workers from the measured per-task costs
   of the largest simulated run, run twice on the same workers: merges are
   charged as the repeat measured them, on reused memory (a long run's merges
   reuse what earlier ones freed), plus new pages once for the merged
   counters the run keeps, at what a page never touched costs on the workers
   (measured there directly; see :func:`_project`).

Usage: ``python benchmarks/distributed.py [--samples 1536] [--sim-samples 768] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# This file is named like the ``distributed`` package: keep its folder off the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # models/ is in the repository, not installed

ALPHAS = (0, 0.5, 1, 2, float("inf"))
FAN_IN = 16  # analyze_sharded's default merge_fan_in


def _same_metrics(a, b) -> bool:
    """Same states, distinct states and entropies (every alpha) per probe, to the last bit."""
    for x, y in zip(a.efficiency_layers, b.efficiency_layers, strict=True):
        if (x.name, x.state_count, x.distinct_count) != (y.name, y.state_count, y.distinct_count):
            return False
        if any(x.entropy(alpha) != y.entropy(alpha) for alpha in ALPHAS):
            return False
    return True


def _single(path, x, batch_size, attach_to):
    """One process: ``predict`` over ``x``, then every probe's efficiency (what a sharded
    run's summaries give); the model, and the seconds of each."""
    from tensorstate_onnx import network_efficiency
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    model = OnnxEfficiencyModel(path, attach_to, providers="cpu")
    model.predict(x[:batch_size], batch_size=batch_size)  # warm up session and kernels
    model.reset_states()
    started = time.perf_counter()
    model.predict(x, batch_size=batch_size)
    predicted = time.perf_counter()
    network_efficiency(model)
    return model, predicted - started, time.perf_counter() - predicted


def _drop_counts():
    """On a worker: shard tasks drop their counters before splitting them (nothing to reduce)."""
    import tensorstate_onnx.distributed.worker as worker

    if not hasattr(worker, "_bench_original"):
        worker._bench_original = worker._result

        def without_counts(job, shard, names, counters, *rest):
            for counter in counters:  # finish the counting, as splitting them would
                if counter is not None:
                    counter.n_distinct  # noqa: B018
            return worker._bench_original(job, shard, names, [None] * len(counters), *rest)

        worker._result = without_counts


def _keep_counts():
    import tensorstate_onnx.distributed.worker as worker

    if hasattr(worker, "_bench_original"):
        worker._result = worker._bench_original
        del worker._bench_original


def _count_merge_faults():
    """On a worker: every merge task also notes the page faults its thread took
    (memory touched for the first time), read by :func:`_merge_faults`."""
    import tensorstate_onnx.distributed.reduce as reduce

    if not hasattr(reduce, "_bench_merge"):
        reduce._bench_merge, reduce._bench_faults = reduce._merge_pieces, []

        def counted(partition, n_partitions, *pieces):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            merged = reduce._bench_merge(partition, n_partitions, *pieces)
            reduce._bench_faults.append((partition, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before))
            return merged

        reduce._merge_pieces = counted
    reduce._bench_faults.clear()


def _merge_faults() -> list:
    import tensorstate_onnx.distributed.reduce as reduce

    return list(getattr(reduce, "_bench_faults", []))


_PAGE = 4096


def _new_page_costs(nbytes: int = 64 * 2**20) -> tuple[float, float]:
    """On a worker: CPU seconds of writing a 4 KiB page of memory this process
    never touched, as small pages and as huge pages (madvised; one fault
    zeroes 2 MiB), per 4 KiB, the mean of three regions (not the best: the
    dearer pages are the ones to charge). A virtual machine's host may have
    to back such a page too, which is what makes it dear."""
    import mmap

    costs = []
    for huge in (False, True):
        seconds = []
        for _ in range(3):
            region = mmap.mmap(-1, nbytes)
            if huge and hasattr(mmap, "MADV_HUGEPAGE"):
                region.madvise(mmap.MADV_HUGEPAGE)
            pages = np.frombuffer(region, np.uint8)
            started = time.thread_time()
            pages[::_PAGE] = 1
            seconds.append((time.thread_time() - started) / (nbytes // _PAGE))
            del pages
            region.close()
        costs.append(float(np.mean(seconds)))
    return costs[0], costs[1]


def _settled_bytes(dask_worker) -> int:
    """On a worker: bytes of the settled partitions it holds (what a run keeps on the cluster)."""
    from tensorstate_onnx.distributed.reduce import _Settled

    return sum(sys.getsizeof(value) for value in dask_worker.data.values() if isinstance(value, _Settled))


def _faults_by_partition(cluster, partitions: int) -> np.ndarray:
    faults = np.zeros(partitions)
    for noted in cluster.client.run(_merge_faults).values():
        for partition, count in noted:
            faults[partition] += count
    return faults


def _worker_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssPeak:
    """The peak RSS of this process while in the block, above its RSS at the start."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _sharded(cluster, path, npy, shard_size, batch_size, attach_to):
    from tensorstate_onnx.distributed import analyze_sharded

    with _RssPeak() as rss:
        started = time.perf_counter()
        scheduler = cluster.scheduler_cpu()
        result = analyze_sharded(path, npy, attach_to, client=cluster.client, shard_size=shard_size, batch_size=batch_size)
        result.stats["scheduler_cpu_seconds"] = cluster.scheduler_cpu() - scheduler
        wall = time.perf_counter() - started
    result.stats["kept_bytes"] = sum(cluster.client.run(_settled_bytes).values())
    result.release()
    return result, wall, rss.peak


def _noop(*args):
    return 0


def _scheduler_cost(cluster, shards: int, partitions: int) -> tuple[float, float, int]:
    """``(scheduler CPU s, client CPU s, tasks)`` of a graph shaped like a run's (shards, facts,
    pieces, merge trees, settled partitions, summaries) whose tasks do nothing: what each task costs to schedule."""
    graph: dict = {}
    for s in range(shards):
        graph[f"s-{s}"] = (_noop,)
        graph[f"i-{s}"] = (_noop, f"s-{s}")
    wanted = [f"i-{s}" for s in range(shards)]
    for j in range(partitions):
        level = []
        for s in range(shards):
            graph[f"p-{s}-{j}"] = (_noop, f"s-{s}")
            level.append(f"p-{s}-{j}")
        depth = 0
        while len(level) > 1 or depth == 0:
            depth += 1
            merged = []
            for g in range(0, len(level), FAN_IN):
                graph[f"m-{j}-{depth}-{g}"] = (_noop, *level[g : g + FAN_IN])
                merged.append(f"m-{j}-{depth}-{g}")
            level = merged
        graph[f"t-{j}"] = (_noop, level[0])
        graph[f"u-{j}"] = (_noop, f"t-{j}")
        wanted.append(f"u-{j}")
    scheduler, client = cluster.scheduler_cpu(), time.process_time()
    futures = cluster.client.get(graph, wanted, sync=False)
    cluster.client.gather(futures)
    del futures
    return cluster.scheduler_cpu() - scheduler, time.process_time() - client, len(graph)


def _move_costs(path, x, shard_size: int, batch_size: int, attach_to, partitions) -> dict:
    """Per number of partitions ``p``: CPU seconds to send one shard's ``p``
    pieces from a worker to another and receive them (Dask's serialization on
    both sides), averaged over the shards of ``x``, as pieces move and with
    each counter in its own pickle instead; and, with more than one shard,
    CPU seconds per shard of data to move the merged pieces of every shard
    (one per partition, as the merge tree's upper levels move them; else
    None). The runs' merge times leave this out: Dask deserializes a task's
    inputs outside the task."""
    import pickle

    from distributed.protocol import deserialize, serialize

    from tensorstate_onnx.distributed.reduce import _merge_pieces, _split
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    def move(pieces) -> float:
        started = time.process_time()
        for piece in pieces:
            deserialize(*serialize(piece, serializers=("pickle",)))
        return time.process_time() - started

    model = OnnxEfficiencyModel(path, attach_to, providers="cpu", threads=1)
    names = tuple(layer.name for layer in model.efficiency_layers)
    costs = {p: [0.0, 0.0] for p in partitions}
    split: dict = {p: [] for p in partitions}
    shards = range(0, len(x) - shard_size + 1, shard_size)
    for shard, start in enumerate(shards):
        model.reset_states()
        model.predict(x[start : start + shard_size], batch_size=batch_size)
        counters = [layer.counter for layer in model.efficiency_layers]
        for p in partitions:
            pieces = _split(counters, shard, names, p)
            costs[p][0] += move(pieces)
            started = time.process_time()
            for piece in pieces:
                pickle.loads(pickle.dumps(piece.counters, protocol=5))
            costs[p][1] += time.process_time() - started
            split[p].append(pieces)
    merged = {p: None for p in partitions}
    if len(shards) > 1:
        for p in partitions:
            merged[p] = move([_merge_pieces(j, p, *(pieces[j] for pieces in split[p])) for j in range(p)]) / len(shards)
    return {p: (moved / len(shards), pickled / len(shards), merged[p]) for p, (moved, pickled) in costs.items()}


def _move_fit(by_p: dict, n_shards: int) -> tuple[float, float]:
    """``(a, b)`` of the least-squares line ``a + b * pieces``: CPU seconds to
    move a shard of data as that many pieces, from :func:`_move_costs`'s
    measurements (a shard's ``p`` pieces, and merged pieces: ``p / n_shards``
    pieces a shard of data). ``a`` is what moving the states costs, ``b`` what
    a piece costs however few states it holds."""
    points = [(p, moved) for p, (moved, _, _) in by_p.items()]
    points += [(p / n_shards, merged) for p, (_, _, merged) in by_p.items() if merged is not None]
    pieces, seconds = np.array(points).T
    b, a = np.polyfit(pieces, seconds, 1)
    return max(0.0, float(a)), max(0.0, float(b))


def _n_tasks(shards: int, partitions: int, fan_in: int = FAN_IN) -> int:
    """Tasks of a run: shard, facts, pieces, merge levels per partition, settled partitions, summaries."""
    merges, level = 0, shards
    while True:
        level = math.ceil(level / fan_in)
        merges += level
        if level == 1:
            break
    return 2 * shards + shards * partitions + partitions * merges + 2 * partitions


def _levels(shards: int, fan_in: int = FAN_IN) -> int:
    return max(1, math.ceil(math.log(max(shards, 1), fan_in) - 1e-9))


def _passes(shards: int, fan_in: int = FAN_IN) -> list[int]:
    """Per level of a partition's merge tree, the passes of its (largest) merge
    task over its states: ``merge_many`` merges pairwise, so a task merging
    ``n`` pieces moves each state ceil(log2 n) times."""
    passes, pieces = [], max(shards, 1)
    for _ in range(_levels(shards, fan_in)):
        passes.append(max(1, math.ceil(math.log2(min(pieces, fan_in)))))
        pieces = math.ceil(pieces / fan_in)
    return passes


def _costs(stats: dict, build_cpu: float) -> dict:
    """Per-task CPU costs of a run (seconds)."""
    shards, partitions = stats["n_shards"], stats["n_partitions"]
    tasks = _n_tasks(shards, partitions)
    merge = sum(stats["partition_merge_cpu_seconds"])
    client = stats["client_process_cpu_seconds"] - build_cpu  # the client's own model build excluded
    scheduler = stats["scheduler_cpu_seconds"]
    reading = stats["client_cpu_seconds"]  # the client thread reading facts and totals
    return dict(
        t_shard=float(np.mean(stats["shard_cpu_seconds"])), t_split=float(np.mean(stats["split_cpu_seconds"])),
        u_merge=merge / (shards * sum(_passes(shards))),  # merge CPU per shard of data and per pairwise pass
        t_settle=sum(stats["partition_settle_cpu_seconds"]) / shards,  # summing up and pickling, per shard of data
        t_read=reading / (shards + partitions),  # per shard fact or partition total read
        t_sched=scheduler / tasks,  # scheduler per task
        tasks=tasks, merge=merge, client=client, scheduler=scheduler,
        work=sum(stats["shard_cpu_seconds"]) + merge + sum(stats["partition_settle_cpu_seconds"]),
    )  # fmt: skip


def _project(c: dict, measured_size: int, shard_size: int, k: int, w: int, p: int, move: tuple) -> tuple[float, float, dict]:
    """Samples/s at ``w`` workers and ``p`` partitions, each worker running
    ``k`` shards of ``shard_size`` samples (per-shard costs measured on shards
    of ``measured_size`` samples scale with the samples: all states distinct;
    moving is measured on shards of ``shard_size`` itself, since much of it
    is a cost per piece: ``move = (t_move, a, b)``, see below).

    A worker's CPU: k*t_shard (count and split) plus its share of the merges,
    k * w / p * sum over the tree levels of (u_merge * passes + t_level * (w - 1) / w)
    (partition merges are spread over the p partitions; all states distinct,
    so each level touches every state, once per pass of its pairwise merges:
    ceil(log2) of the pieces a task merges; and every piece but those already on
    the merging worker is sent and received: at the first level a shard's p
    pieces, t_move as measured; at level L the merged pieces, p / FAN_IN^(L-1)
    a shard of data, a + b * p / FAN_IN^(L-1) from the fit of the moves), and
    k * (t_settle + t_keep) * w / p for settling its share of the merged
    partitions (their totals and the pickles kept on the cluster) and the new
    memory those take (touched once: the memory of every other merge is
    reused). The scheduler handles tasks(k*w, p) tasks at t_sched each; the
    client builds and sends them at t_submit each and reads k*w + p results at
    t_read each, both while the workers run. T = the largest of the three;
    linear = w * shard_size / t_shard.
    """
    scale = shard_size / measured_size
    shards = k * w
    t_move, a, b = move
    passes = _passes(shards)
    moves = [t_move] + [a + b * p / FAN_IN**level for level in range(1, len(passes))]
    merging = sum(scale * c["u_merge"] * n + t * (w - 1) / w for n, t in zip(passes, moves, strict=True))
    worker = k * (scale * (c["t_shard"] + (c["t_settle"] + c["t_keep"]) * w / p) + merging * w / p)
    sched = _n_tasks(shards, p) * c["t_sched"]
    client = _n_tasks(shards, p) * c["t_submit"] + (shards + p) * c["t_read"]
    total = max(worker, sched, client)
    samples = shards * shard_size / total
    linear = w * shard_size / (scale * c["t_shard"])
    return samples, samples / linear, dict(worker=worker, sched=sched, client=client)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1536, help="samples of the one-process vs 2-worker runs")
    parser.add_argument("--sim-samples", type=int, default=768, help="samples of the simulated runs (and twice as many)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sim-workers", type=int, default=8)
    parser.add_argument("--attach-to", nargs="+", default=["Conv"], help="probes (default: every Conv)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant; the best is reported")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tensorstate-bench-"))
    try:
        _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_CLUSTER = """
import sys
from tensorstate_onnx.distributed.connect import local_cluster
if __name__ == "__main__":
    cluster = local_cluster({workers}, 1)  # as analyze_sharded(n_workers=...) starts one
    print(cluster.scheduler_address, flush=True)
    sys.stdin.read()
    cluster.close()
"""


class _Cluster:
    """A LocalCluster in a process of its own, so that this process holds the client alone:
    its CPU is the client's, the other process's is the scheduler's (and the nannies').
    Its workers are started as a run started by tensorstate starts them (``local_cluster``:
    Dask's defaults, except that freed memory is kept for reuse)."""

    def __init__(self, workers: int):
        import subprocess

        import distributed
        import psutil

        self.process = subprocess.Popen(
            [sys.executable, "-c", _CLUSTER.format(workers=workers)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        address = self.process.stdout.readline().strip()
        self.client = distributed.Client(address)
        self.client.wait_for_workers(workers)
        self.scheduler = psutil.Process(self.process.pid)

    def scheduler_cpu(self) -> float:
        times = self.scheduler.cpu_times()
        return times.user + times.system

    def close(self):
        self.client.close()
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _run(args, tmp: Path) -> None:
    from tensorstate_onnx.graph import save_model
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from models.onnx_models import mobilenet_v2_small_onnx

    path = save_model(mobilenet_v2_small_onnx(), tmp / "mobilenet_v2_small.onnx")
    n_max = max(args.samples, 2 * args.sim_samples)
    x = np.random.default_rng(0).normal(size=(n_max, 3, 96, 96)).astype(np.float32)
    files = {}
    for n in {args.samples, args.sim_samples, 2 * args.sim_samples}:
        files[n] = tmp / f"x{n}.npy"
        np.save(files[n], x[:n])
    build = time.process_time()
    OnnxEfficiencyModel(path, args.attach_to, providers="cpu")
    build_cpu = time.process_time() - build
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; client model build {build_cpu:.2f} CPU s", flush=True)

    # 1. One process vs 2 workers (wall time).
    cluster = _Cluster(2)
    client = cluster.client
    _sharded(cluster, path, files[args.sim_samples], 32, 32, args.attach_to)  # warm up sessions and kernels
    best: dict = {}
    reference = None
    for repeat in range(args.repeats):
        model, wall, metrics = _single(path, x[: args.samples], args.batch_size, args.attach_to)
        reference = reference or model
        best["single"] = min(best.get("single", math.inf), wall)
        best["single+metrics"] = min(best.get("single+metrics", math.inf), wall + metrics)
        client.run(_drop_counts)
        _, wall, _ = _sharded(cluster, path, files[args.samples], args.shard_size, args.batch_size, args.attach_to)
        client.run(_keep_counts)
        best["dropped"] = min(best.get("dropped", math.inf), wall)
        result, wall, _ = _sharded(cluster, path, files[args.samples], args.shard_size, args.batch_size, args.attach_to)
        same = _same_metrics(reference, result.model)
        if wall < best.get("cluster", (math.inf,))[0]:
            best["cluster"] = (wall, result.stats, same)
        print(f"[{repeat}] one process {args.samples / best['single']:.0f} samples/s; 2 workers "
              f"{args.samples / wall:.0f} samples/s, same metrics as one process: {same}", flush=True)  # fmt: skip
    cluster.close()
    single, dropped, complete = best["single"], best["dropped"], best["single+metrics"]
    wall, stats, same = best["cluster"]
    print()
    print(f"### One process vs 2 workers ({args.samples} samples, shards of {args.shard_size}, "
          f"{stats['n_partitions']} partitions, best of {args.repeats})")  # fmt: skip
    print()
    print("| run | samples/s | vs one process | reduction share | same metrics (every alpha) |")
    print("|---|---:|---:|---:|---|")
    print(f"| one process (onnxruntime on all cores), predict | {args.samples / single:.0f} | 1.00x | - | - |")
    print(f"| one process, predict and every efficiency after it | {args.samples / complete:.0f} | "
          f"{single / complete:.2f}x | - | - |")  # fmt: skip
    print(f"| 2 workers, counters dropped (nothing reduced) | {args.samples / dropped:.0f} | {single / dropped:.2f}x | 0 | - |")
    print(f"| 2 workers, partitioned reduction | {args.samples / wall:.0f} | {single / wall:.2f}x | "
          f"{max(0.0, 1 - dropped / wall):.1%} | {same} |")  # fmt: skip
    print()
    print(f"2 workers against one process's predict and efficiencies (a sharded run's summaries give "
          f"the efficiencies): {complete / wall:.2f}x")  # fmt: skip

    # 2. Simulated workers (CPU seconds).
    rows = []
    largest = None
    for workers in (2, args.sim_workers):
        cluster = _Cluster(workers)
        _sharded(cluster, path, files[args.sim_samples], 32, 32, args.attach_to)  # warm up every worker
        sizes = [args.sim_samples, 2 * args.sim_samples]
        if workers == args.sim_workers:
            sizes.append(2 * args.sim_samples)  # again: the workers reuse the memory the first run freed
        runs = []
        for n in sizes:
            cluster.client.run(_count_merge_faults)
            result, wall, rss = _sharded(cluster, path, files[n], args.shard_size, args.batch_size, args.attach_to)
            worker_rss = max(cluster.client.run(_worker_peak_rss).values())
            c = _costs(result.stats, build_cpu)
            faults = _faults_by_partition(cluster, result.stats["n_partitions"])
            distinct = sum(layer.distinct_count for layer in result.model.efficiency_layers)
            rows.append((workers, n, result.stats, c, rss, worker_rss, distinct, faults.sum()))
            runs.append((n, result.stats, c, faults, result.stats["kept_bytes"]))
            print(f"simulated {workers} workers, {n} samples: {distinct:,} distinct states, client CPU "
                  f"{c['client']:.2f} s, client RSS +{rss / 2**20:.0f} MiB, merge page faults "
                  f"{faults.sum():,.0f}", flush=True)  # fmt: skip
        if workers == args.sim_workers:
            largest = (workers, runs[-2], runs[-1])
            page_costs = cluster.client.run(_new_page_costs)
            sched_cpu, sched_client, sched_tasks = _scheduler_cost(cluster, 128, 16)
        cluster.close()
    print()
    print(f"### Simulated workers (single-threaded, on {os.cpu_count()} cores; CPU seconds)")
    print()
    print("| workers | samples | distinct states | partitions | task CPU s | client CPU s (share) "
          "| scheduler CPU s (share) | merge CPU s per partition (mean / max) "
          "| merge page faults | client peak RSS above start | worker peak RSS |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers, n, stats, c, rss, worker_rss, distinct, faults in rows:
        merges = stats["partition_merge_cpu_seconds"]
        run = c["work"] + c["client"] + c["scheduler"]
        print(f"| {workers} | {n} | {distinct:,} | {stats['n_partitions']} | {c['work']:.1f} | "
              f"{c['client']:.2f} ({c['client'] / run:.1%}) | {c['scheduler']:.2f} ({c['scheduler'] / run:.1%}) | "
              f"{np.mean(merges):.2f} / {np.max(merges):.2f} | {faults:,.0f} | {rss / 2**20:.0f} MiB | {worker_rss / 2**20:.0f} MiB |")  # fmt: skip

    # 3. Projection.
    # A long run's merges reuse what earlier ones freed (u_merge: the repeat's
    # merges, less the few new pages they still took); only the merged counters
    # kept on the cluster need new memory, once (t_keep: their pages at what a
    # page never touched costs on the workers, measured directly, the dearer of
    # small and huge pages). Comparing the first run's merges with the repeat's
    # is no measure of a page: the first run pays other first-time costs too.
    workers, (n, _, cold, cold_faults, kept), (_, warm_stats, c, warm_faults, _) = largest
    warm_cpu = sum(warm_stats["partition_merge_cpu_seconds"])
    small_page, huge_page = np.median(list(page_costs.values()), axis=0)
    shards = warm_stats["n_shards"]
    c["u_merge"] = max(0.0, warm_cpu - small_page * warm_faults.sum()) / (shards * sum(_passes(shards)))
    c["t_keep"] = max(small_page, huge_page) * kept / _PAGE / shards
    in_run = c["t_sched"]
    big, size = 1_280_000, 1024
    wanted = sorted({p for w in (8, 64, 512) for p in (w, min(w, 64), min(w, 16))})
    measured = ((args.shard_size, 4), (size, 1))
    moves = {
        shard: _move_costs(path, x[: n_shards * shard], shard, args.batch_size, args.attach_to, wanted)
        for shard, n_shards in measured
    }  # fmt: skip
    fits = {shard: _move_fit(moves[shard], n_shards) for shard, n_shards in measured}
    c = {**c, "t_sched": sched_cpu / sched_tasks, "t_submit": sched_client / sched_tasks}
    moving = "; ".join(
        f"shards of {shard}, P = {p}: {moved:.3f} ({pickled:.3f} with each counter in its own pickle"
        + ("" if merged is None else f"; the {dict(measured)[shard]} shards' pieces merged: {merged:.3f} a shard")
        + ")"
        for shard, by_p in moves.items() for p, (moved, pickled, merged) in by_p.items()
    ) + "; fit a + b * pieces a shard: " + "; ".join(
        f"shards of {shard}: a = {a:.4f}, b = {b * 1e3:.3f} ms" for shard, (a, b) in fits.items()
    )  # fmt: skip
    k = max(1, round(n / args.shard_size / workers))
    print()
    print(f"### Projection (from the {workers}-worker run of {n} samples; k = {k} shards of {args.shard_size} per worker)")
    print()
    print(f"Measured: t_shard = {c['t_shard']:.3f} CPU s per shard (of which splitting {c['t_split']:.3f}), "
          f"t_settle = {c['t_settle']:.4f}, u_merge = {c['u_merge']:.4f} CPU s per shard and pass of the pairwise merges on reused memory ({cold['u_merge']:.4f} "
          f"as the first run measured it, its merges taking {cold_faults.sum():,.0f} page faults against "
          f"{warm_faults.sum():,.0f} in the repeat), a page never touched = {small_page * 1e6:.2f} us ({huge_page * 1e6:.2f} "
          f"per 4 KiB of a huge page) on the workers, t_keep = "
          f"{c['t_keep']:.4f} CPU s per shard for the new pages of the merged counters kept on the cluster ({kept / 2**20:.0f} MiB), t_move = CPU s to send and receive a "
          f"shard's P pieces (measured in this process: {moving}), t_read = {c['t_read'] * 1e3:.2f} ms "
          f"per result read, t_submit = {c['t_submit'] * 1e3:.3f} ms of client CPU per task, t_sched = {c['t_sched'] * 1e3:.2f} ms of scheduler CPU per task (a graph of "
          f"{sched_tasks:,} tasks shaped like a run's, doing nothing: {sched_cpu:.2f} s of scheduler and "
          f"{sched_client:.2f} s of client CPU; the runs above average {in_run * 1e3:.2f} ms, their "
          "scheduler's and nannies' CPU over the whole run per task).")  # fmt: skip
    print()
    print("| workers | partitions | tasks | worker s | scheduler s | client s | samples/s | vs linear |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in (8, 64, 512):
        for p in sorted({w, min(w, 64), min(w, 16)}, reverse=True):
            move = (moves[args.shard_size][p][0], *fits[args.shard_size])
            samples, ratio, parts = _project(c, args.shard_size, args.shard_size, k, w, p, move)
            print(f"| {w} | {p} | {_n_tasks(k * w, p):,} | {parts['worker']:.1f} | {parts['sched']:.1f} | "
                  f"{parts['client']:.2f} | {samples:.0f} | {ratio:.2f}x |")  # fmt: skip
    print()
    print(f"A {big:,}-sample run of this model (96x96 inputs), shards of {size} samples:")
    print()
    print("| workers | partitions | shards per worker | tasks | worker s | scheduler s | client s | hours | vs linear |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in (8, 64, 512):
        k_big = math.ceil(big / (w * size))
        for p in sorted({w, min(w, 64), min(w, 16)}, reverse=True):
            samples, ratio, parts = _project(c, args.shard_size, size, k_big, w, p, (moves[size][p][0], *fits[size]))
            print(f"| {w} | {p} | {k_big} | {_n_tasks(k_big * w, p):,} | {parts['worker']:.0f} | "
                  f"{parts['sched']:.0f} | {parts['client']:.1f} | {big / samples / 3600:.2f} | {ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
