"""Reaching the Dask cluster a sharded run uses: a running scheduler by address
(checked before Dask builds a client, so a wrong address fails at once), or a
LocalCluster of worker processes started for the run (:func:`local_cluster`)."""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

from .._optional import import_optional
from .._system import usable_cpus
from ..errors import OptionTypeError, SchedulerConnectionError
from ..heap import kept_memory_environ


#: Environment of the worker processes :func:`local_cluster` starts: glibc malloc
#: keeps up to 1 GiB of freed memory for reuse instead of returning it to the
#: OS (Dask's default returns everything over 64 KiB), in the threads that run
#: the tasks too (one arena: see :func:`tensorstate_onnx.heap.kept_memory_environ`).
#: Each shard allocates and frees its counters (tens to hundreds of MB); memory
#: handed back is faulted in again by the next shard, which on virtual machines
#: costs several microseconds a page (see benchmarks/RESULTS.md). Must be set
#: before a worker process starts; for a cluster of your own, put it in Dask's
#: ``distributed.nanny.pre-spawn-environ``.
WORKER_ENVIRON = kept_memory_environ()


def dask_modules():
    """Import dask and dask.distributed, or explain how to install them."""
    return tuple(import_optional(name, "distributed", "distributed analysis") for name in ("dask", "distributed"))


def check_scheduler_address(address: str, timeout: float) -> None:
    """Refuse an address Dask cannot parse, and one where nothing listens, at
    once: Dask itself retries a refused port until ``timeout`` and leaves a
    half-built client that complains when collected."""
    _, distributed = dask_modules()
    if not isinstance(address, str):
        raise OptionTypeError(f"scheduler must be an address string like 'tcp://host:8786', not {type(address).__name__}")
    try:
        scheme, _ = distributed.comm.parse_address(address)
    except Exception as exc:
        raise SchedulerConnectionError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. tcp://host:8786") from None
    known = sorted(distributed.comm.registry.backends)
    if scheme not in known:
        raise SchedulerConnectionError(
            f"unknown scheme {scheme!r} in the scheduler address {address!r}; use one of {known}, e.g. tcp://host:8786"
        )
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = distributed.comm.get_address_host_port(address)
    except Exception as exc:
        raise SchedulerConnectionError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. tcp://host:8786") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        raise SchedulerConnectionError(
            f"nothing listens at {address} (connection refused); start the scheduler (`dask scheduler`) "
            "or check the address"
        ) from None
    except OSError:
        pass  # unreachable or slow: Dask's own connect reports it within the timeout


@contextmanager
def connect(client, scheduler, n_workers, threads_per_worker, timeout):
    """Yield ``(client, n_workers)``: the given client, one for ``scheduler``, or a new LocalCluster."""
    _, distributed = dask_modules()
    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            own = distributed.Client(scheduler, timeout=timeout, set_as_default=False)
        except Exception as exc:
            raise SchedulerConnectionError(
                f"could not connect to the Dask scheduler at {scheduler!r} within {timeout} s "
                f"({type(exc).__name__}: {exc}); check the address and that the scheduler is running"
            ) from None
        try:
            yield own
        finally:
            own.close()
        return
    cluster = local_cluster(n_workers or usable_cpus(), threads_per_worker)
    try:
        own = distributed.Client(cluster, set_as_default=False)
        try:
            yield own
        finally:
            own.close()
    finally:
        cluster.close()


def local_cluster(n_workers: int, threads_per_worker: int | None):
    """A LocalCluster of ``n_workers`` worker processes started with :data:`WORKER_ENVIRON`."""
    dask, distributed = dask_modules()
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={}), **WORKER_ENVIRON}
    # Dask's nannies prefer this process's environment to their configuration, and
    # write their settings into it when they start a worker: set ours, then put it back.
    saved = {name: os.environ.get(name) for name in WORKER_ENVIRON}
    os.environ.update(WORKER_ENVIRON)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            return distributed.LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                dashboard_address=":0", silence_logs=logging.ERROR,
            )  # fmt: skip
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def n_workers_of(client, timeout) -> int:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception as exc:
        raise SchedulerConnectionError(
            f"the Dask scheduler at {client.scheduler.address} has no workers (waited {timeout} s: {exc}); "
            "start workers with `dask worker ADDRESS`"
        ) from None
    return max(1, len(client.nthreads()))
