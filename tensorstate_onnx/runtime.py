"""Run a probed ONNX model in onnxruntime and feed its probes to the engine.

``OnnxEfficiencyModel`` rewrites a model so the chosen tensors become extra
outputs (see :mod:`tensorstate_onnx.graph`), runs it batch by batch, returns
the original outputs, and hands each probe's tensor (or its in-graph packed
bytes) to an :class:`~tensorstate_onnx.capture.AbstractStateCapture`. Counting
of one batch runs on a worker thread while onnxruntime computes the next; both
release the GIL.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from . import graph
from .accuracy import check_class_labels, count_correct
from .binding import ORT_DTYPES, BoundRunner, uses_cuda
from .capture import AbstractStateCapture, positions_kept, sweep_stale_stores
from .data import Batch, cache_sized_batch, iter_batches, n_samples
from .errors import ModelFileError, ModelInputError, OptionError, OptionTypeError, ProviderError, first_line
from .graph import Probe, owned_copy, probe_in_place, save_model
from .store import check_storage_root, unique_store_dirname

__all__ = ["OnnxEfficiencyModel", "OnnxProbeCapture", "resolve_providers"]

log = logging.getLogger(__name__)

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnxruntime's own exceptions derive from Exception alone: catch them by name.
_ORT_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented",
                 "RuntimeException", "NoSuchFile", "NoModel", "EngineError", "EPFail")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)  # fmt: skip



def _reads_weights_from_files(model) -> bool:
    """Whether the session can read ``model``'s weights from its file: a path, and an
    onnxruntime that takes the folder of external data for a model given as bytes (1.21)."""
    version = tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())
    return isinstance(model, (str, os.PathLike)) and version >= (1, 21)


class OnnxProbeCapture(AbstractStateCapture):
    """The capture of one ONNX probe; ``probe`` says which tensor it watches."""

    def __init__(self, probe: Probe, disk_path=None, keep_states: bool = False, overwrite: bool = False):
        metadata = {
            "label": probe.label,
            "node": probe.node_name,
            "op_type": probe.op_type,
            "method": probe.method,
            "tensor": probe.tensor_name,
            "channel_axis": probe.channel_axis,
        }
        super().__init__(probe.name, disk_path, keep_states, overwrite, metadata)
        self.probe = probe
        self.channel_axis = probe.channel_axis
        self.axis_guessed = probe.axis_guessed

    def record_outputs(self, values: dict[str, np.ndarray], batch_size: int, mask: np.ndarray | None = None) -> None:
        """Record one batch: the session output of every call of this probe, in call order."""
        for call in self.probe.each_call():
            shape = None if call.shape_output is None else values[call.shape_output]
            self.record_output(values[call.output_name], batch_size, call, mask, shape)

    def record_output(
        self, value: np.ndarray, batch_size: int, probe: Probe | None = None, mask: np.ndarray | None = None,
        shape: np.ndarray | None = None,
    ) -> None:
        """Record one batch of this probe's session output (of its call ``probe``);
        ``mask`` (``[batch, length]``, true where real) leaves out padded positions.
        ``shape``, the probed tensor's shape when it was packed in the graph, puts
        its rows in batch order (see :func:`~tensorstate_onnx.capture.batch_axis`)."""
        probe = self.probe if probe is None else probe
        if probe.packed_in_graph:
            instances = batch_size if len(probe.shape) == 1 or probe.channel_axis != 0 else 1
            self.channel_axis = probe.channel_axis
            if shape is not None:
                shape = tuple(int(d) for d in shape)
                value = _rows_batch_first(value, shape, probe.channel_axis, self.find_sample_axis(shape, probe.channel_axis, batch_size))
            self.record_packed(value, probe.n_neurons, instances, positions_kept(mask, value.shape[0], instances, self.name))
        else:
            axis = probe.channel_axis % max(value.ndim, 2)
            states = value.size // value.shape[axis] if value.ndim > 1 else value.size
            self.record(value, probe.channel_axis, positions_kept(mask, states, batch_size, self.name), batch_size)


def _rows_batch_first(packed: np.ndarray, shape: tuple[int, ...], channel_axis: int, first: int) -> np.ndarray:
    """The packed rows of a tensor of ``shape`` (in its row-major order) reordered
    with axis ``first`` (the samples') first, as :meth:`AbstractStateCapture.record` orders them."""
    axis = channel_axis % len(shape)
    if not first:
        return packed
    positions = [d for k, d in enumerate(shape) if k != axis]
    rows = packed.reshape(*positions, packed.shape[-1])
    return np.ascontiguousarray(np.moveaxis(rows, first - (first > axis), 0)).reshape(packed.shape)


def _bytes_per_sample(session: ort.InferenceSession, names: set[str]) -> int | None:
    """Bytes the session's outputs ``names`` hold per sample (every axis after
    the first), or None when one has an axis of unknown size or a type not
    in :data:`~tensorstate_onnx.binding.ORT_DTYPES`."""
    total = 0
    for arg in session.get_outputs():
        if arg.name not in names:
            continue
        dims = arg.shape[1:]
        if arg.type not in ORT_DTYPES or not all(isinstance(d, int) and d >= 0 for d in dims):
            return None
        total += int(np.prod(dims, dtype=np.int64)) * np.dtype(ORT_DTYPES[arg.type]).itemsize
    return total


def _check_options(storage_path, threads, channel_axes, mask_input, flags: dict) -> None:
    """Refuse options of the wrong kind before anything is built (a float thread count, a
    flag given as a string, a path that is not one)."""
    if storage_path is not None and not isinstance(storage_path, (str, os.PathLike)):
        raise OptionTypeError(f"storage_path must be a directory path (str or os.PathLike), not {type(storage_path).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise OptionError(f"threads must be a positive int (onnxruntime's intra-op threads) or None, got {threads!r}")
    if channel_axes is not None and not isinstance(channel_axes, dict):
        raise OptionTypeError(
            f"channel_axes must be a dict of probe name -> neuron axis, not {type(channel_axes).__name__}"
        )
    if mask_input is not None and not isinstance(mask_input, str):
        raise OptionTypeError(f"mask_input must be the name of a model input, not {type(mask_input).__name__}")
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise OptionTypeError(f"{name} must be True or False, not {value!r}")


def resolve_providers(providers: str | Iterable[str] = "auto") -> list[str]:
    """onnxruntime provider names for ``"auto"``, ``"cpu"``, ``"cuda"`` or an explicit list."""
    available = ort.get_available_providers()
    if isinstance(providers, str):
        choice = providers.lower()
        if choice == "auto":
            chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
            log.info("onnxruntime providers (auto): %s", ", ".join(chosen))
            return chosen
        if choice not in _PROVIDERS:
            raise ProviderError(
                f"unknown provider {providers!r}; use 'auto', 'cpu', 'cuda' or a list of "
                f"onnxruntime provider names (available here: {', '.join(available)})"
            )
        providers = [_PROVIDERS[choice]] + (["CPUExecutionProvider"] if choice == "cuda" else [])
    if isinstance(providers, (bytes, dict)) or not isinstance(providers, Iterable):
        providers = None
    else:
        providers = list(providers)
    if not providers or not all(isinstance(name, str) for name in providers):
        raise ProviderError(
            "providers must be 'auto', 'cpu', 'cuda' or a non-empty list of onnxruntime provider names "
            f"(available here: {', '.join(available)})"
        )
    missing = [name for name in providers if name not in available]
    if missing:
        hint = " install the 'gpu' extra (onnxruntime-gpu) and check the CUDA drivers;" if "CUDAExecutionProvider" in missing else ""
        raise ProviderError(
            f"onnxruntime provider(s) {', '.join(missing)} not available;{hint} "
            f"available here: {', '.join(available)}"
        )
    return providers


class OnnxEfficiencyModel:
    """An ONNX model with state probes, run by onnxruntime.

    Args:
        model: ``onnx.ModelProto`` or path of an ``.onnx`` file.
        attach_to, exclude, method, channel_axes, pack_in_graph: which tensors
            to probe and how (see :func:`tensorstate_onnx.graph.add_probes`).
        storage_path: directory for one zarr store of raw states per probe;
            must not exist yet unless ``overwrite``. Without it only counts are
            kept (memory grows with distinct states, not samples) unless
            ``keep_states=True``.
        providers: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``,
            ``"cuda"`` or a list of onnxruntime provider names.
        optimization: onnxruntime graph optimization level: ``"all"``,
            ``"extended"``, ``"basic"`` or ``"disable"``.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        io_binding: run through onnxruntime IO binding, the probe outputs
            written into host buffers reused batch after batch (no allocation,
            and on CUDA a single device-to-host copy). ``None`` (default): on
            with the CUDA provider, off on CPU.
        mask_input: name of a model input (``attention_mask``) whose zero
            positions are not recorded: states of probes with one state per
            position (``[batch, length, features]``) at those positions are
            neither counted nor stored, and token accuracy leaves them out.
    """

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike,
        attach_to,
        exclude=(),
        method: str = "after",
        storage_path: str | os.PathLike | None = None,
        *,
        providers: str | Iterable[str] = "auto",
        optimization: str = "all",
        pack_in_graph: bool = False,
        channel_axes: dict | None = None,
        keep_states: bool = False,
        overwrite: bool = False,
        threads: int | None = None,
        io_binding: bool | None = None,
        mask_input: str | None = None,
    ):
        if optimization not in _OPTIMIZATION_LEVELS:
            raise OptionError(
                f"unknown optimization level {optimization!r}; use one of {', '.join(_OPTIMIZATION_LEVELS)}"
            )
        _check_options(
            storage_path=storage_path, threads=threads, channel_axes=channel_axes, mask_input=mask_input,
            flags=dict(pack_in_graph=pack_in_graph, keep_states=keep_states, overwrite=overwrite),
        )  # fmt: skip
        self.providers = resolve_providers(providers)
        self.storage_path = None if storage_path is None else Path(storage_path)
        if self.storage_path is not None:
            check_storage_root(self.storage_path, overwrite)
        # Rewritten in place: a large model is held once, and a file's weights not at
        # all when onnxruntime can read them from the file itself.
        if _reads_weights_from_files(model):
            work = graph.load_model_deferred(model)
            self._weights_folder = Path(model).absolute().parent if graph.has_deferred_weights(work) else None
        else:
            work, self._weights_folder = owned_copy(model), None
        self._described = f"model {os.fspath(model)!r}" if isinstance(model, (str, os.PathLike)) else (
            f"model graph {work.graph.name!r}"
        )
        self.output_names = [output.name for output in work.graph.output]
        self._probed, self.probes = probe_in_place(
            work, attach_to, exclude=exclude, method=method,
            channel_axes=channel_axes, pack_in_graph=pack_in_graph,
        )
        del work
        store_dirs: set[str] = set()
        self.efficiency_layers = [
            OnnxProbeCapture(
                probe,
                None if self.storage_path is None else self.storage_path / unique_store_dirname(probe.name, store_dirs),
                keep_states=keep_states,
                overwrite=overwrite,
            )
            for probe in self.probes
        ]
        sweep_stale_stores(self.efficiency_layers, self.storage_path, overwrite)
        self.session = self._make_session(optimization, threads)
        self.inputs = self.session.get_inputs()
        if mask_input is not None and mask_input not in {spec.name for spec in self.inputs}:
            raise ModelInputError(
                f"mask_input {mask_input!r} is not an input of the {self._described}; its inputs are "
                f"{[spec.name for spec in self.inputs]}"
            )
        self.mask_input = mask_input
        # Probes sharing a tensor share its output: request each output name once.
        calls = [call for probe in self.probes for call in probe.each_call()]
        shapes = {call.shape_output for call in calls if call.shape_output is not None}
        probe_outputs = [call.output_name for call in calls] + sorted(shapes)
        self._run_outputs = list(dict.fromkeys(self.output_names + probe_outputs))
        #: Samples a batch holds when ``predict``/``evaluate`` split arrays and no
        #: ``batch_size`` is given: 256, fewer on CPU where a batch's probe outputs
        #: would not fit in cache (see :func:`tensorstate_onnx.data.cache_sized_batch`).
        # (A probe packed in the graph gives states, not samples, on its first axis.)
        packed = any(call.packed_in_graph for call in calls)
        self.default_batch_size = cache_sized_batch(
            None if packed or uses_cuda(self.session) else _bytes_per_sample(self.session, set(probe_outputs))
        )
        if io_binding is None:
            io_binding = uses_cuda(self.session)
        self._runner = (
            BoundRunner(self.session, self._run_outputs, set(probe_outputs) - set(self.output_names) - shapes)
            if io_binding
            else None
        )
        self._recorder = ThreadPoolExecutor(1, thread_name_prefix="tensorstate-record")

    def _make_session(self, optimization: str, threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization]
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        # Idle onnxruntime threads would spin on the cores the recording thread
        # counts batch k on while batch k + 1 runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            if not graph.needs_external_data(self._probed):
                if self._weights_folder is not None:
                    # The large weights stay in the model's files, read from there once;
                    # onnxruntime then looks for no external data in memory.
                    options.add_session_config_entry(
                        "session.model_external_initializers_file_folder_path", str(self._weights_folder)
                    )
                    light, files = self._probed, {}
                elif hasattr(options, "add_external_initializers_from_files_in_memory"):
                    # The weights go to onnxruntime as in-memory external data files, not
                    # inside the serialized model: one transient copy instead of two.
                    light, files = graph.io.split_weights(self._probed)
                else:  # onnxruntime < 1.18: the whole model's bytes
                    light, files = self._probed, {}
                if files:
                    options.add_external_initializers_from_files_in_memory(
                        list(files), list(files.values()), [len(data) for data in files.values()]
                    )
                return ort.InferenceSession(light.SerializeToString(), options, providers=self.providers)
            with tempfile.TemporaryDirectory() as tmp:  # over protobuf's 2 GiB even without them
                path = save_model(self.model, Path(tmp, "probed.onnx"), external_data=True)
                return ort.InferenceSession(str(path), options, providers=self.providers)
        except _ORT_ERRORS as exc:
            text = first_line(exc)
            if "External initializer" in text or "external data" in text.lower():
                cause = "its external data (weights in files beside it) cannot be read in full; the files are damaged or truncated: copy or export them again"
            else:
                cause = "an operator or opset it does not implement, or an invalid graph; re-export the model with a supported opset"
            raise ModelFileError(f"onnxruntime cannot load the {self._described}: {text} ({cause})") from exc

    @property
    def model(self) -> onnx.ModelProto:
        """The probed model (original outputs first, then the probes' outputs).

        When the model was read from a file, the session read its weights from
        that file and this object does not hold them: each access returns a new
        ModelProto with the weights read from the file again.
        """
        if self._weights_folder is None:
            return self._probed
        try:
            return graph.with_weights(self._probed, self._weights_folder)
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelFileError(
                f"the weights of the {self._described} are read from its files, which were moved or "
                f"deleted after the session was built ({first_line(exc)}); the session still runs, but "
                "the model must be opened again from where its files are now"
            ) from exc

    # ------------------------------------------------------------------ inputs

    def _feed(self, inputs) -> dict[str, np.ndarray]:
        """Check one batch of inputs against the model and name them."""
        if isinstance(inputs, dict):
            feed = dict(inputs)
        elif len(self.inputs) == 1:
            feed = {self.inputs[0].name: inputs}
        else:
            raise ModelInputError(
                f"the model has {len(self.inputs)} inputs ({', '.join(i.name for i in self.inputs)}); "
                "pass a dict that maps each input name to an array"
            )
        expected = {i.name: i for i in self.inputs}
        unknown = sorted(set(feed) - set(expected))
        missing = sorted(set(expected) - set(feed))
        if unknown or missing:
            raise ModelInputError(
                f"input names do not match the model: expected {sorted(expected)}, got {sorted(feed)}"
                + (f" (unknown: {unknown})" if unknown else "")
                + (f" (missing: {missing})" if missing else "")
            )
        return {name: self._check_input(expected[name], value) for name, value in feed.items()}

    @staticmethod
    def _check_input(spec, value) -> np.ndarray:
        value = np.asarray(value)
        want = ORT_DTYPES.get(spec.type)
        if want is not None and value.dtype != want:
            if value.dtype.kind == "f" and np.dtype(want).kind == "f":
                value = value.astype(want)
            else:
                raise ModelInputError(
                    f"input {spec.name!r} expects {np.dtype(want).name} data, got {value.dtype.name}; "
                    "convert it (and normalize it as the model was trained) first"
                )
        shape = list(spec.shape)
        if value.ndim != len(shape) or any(
            isinstance(dim, int) and dim != got for dim, got in zip(shape, value.shape)
        ):
            raise ModelInputError(
                f"input {spec.name!r} expects shape {_shape_text(shape)}, got {tuple(value.shape)}"
            )
        if value.ndim > 1 and value.shape[0] == 0:  # a rank-1 input may be an empty sequence
            raise ModelInputError(f"input {spec.name!r} got an empty batch (shape {tuple(value.shape)})")
        return value

    @property
    def fixed_batch_size(self) -> int | None:
        """The batch size the model's inputs are fixed to (exported detectors often
        take exactly 1), or None when their batch axis is free."""
        firsts = {spec.shape[0] for spec in self.inputs if spec.shape}
        if len(firsts) == 1 and isinstance(first := next(iter(firsts)), int) and first > 0:
            return first
        return None

    def run_batch_size(self, batch_size: int | None = None) -> int:
        """The batch size :meth:`predict` and :meth:`evaluate` run with when given
        ``batch_size`` (None: the default): the model's fixed batch size, which
        refuses any other, else ``batch_size``, else :attr:`default_batch_size`."""
        fixed = self.fixed_batch_size
        if fixed is None:
            return self.default_batch_size if batch_size is None else batch_size
        if batch_size is not None and batch_size != fixed:
            raise OptionError(
                f"the {self._described} takes batches of exactly {fixed} (its inputs' first axis is "
                f"fixed), so batch_size={batch_size!r} cannot be used; leave batch_size out"
            )
        return fixed

    def check_whole_batches(self, n: int) -> None:
        """Refuse ``n`` samples that a fixed batch size of the model does not divide."""
        fixed = self.fixed_batch_size
        if fixed is not None and n % fixed:
            raise ModelInputError(
                f"the {self._described} takes batches of exactly {fixed} samples, but the data holds "
                f"{n}; give a multiple of {fixed}"
            )

    def _batch_size_for(self, data, batch_size: int | None) -> int:
        """:meth:`run_batch_size`; with a fixed batch size, arrays whose samples do
        not fill whole batches are refused before the run."""
        batch_size = self.run_batch_size(batch_size)
        head = data[0] if isinstance(data, tuple) and data else data
        if self.fixed_batch_size is not None and (hasattr(head, "shape") or isinstance(head, dict)):
            self.check_whole_batches(n_samples(head))
        return batch_size

    # ------------------------------------------------------------------ running

    def run(self, inputs) -> list[np.ndarray]:
        """Run one batch; record its probes; return the model's original outputs."""
        outputs, pending, _ = self._run_batch(self._feed(inputs))
        pending.result()
        return outputs

    __call__ = run

    def _run_batch(self, feed: dict[str, np.ndarray], previous: Future | None = None):
        """Run one batch and queue its recording; return ``(outputs, pending, mask)``,
        the mask (true where real) being None without ``mask_input``."""
        try:
            if self._runner is None:
                values = self.session.run(self._run_outputs, feed)
            else:  # probe buffers are reused two runs later; batch k is counted before k + 2 runs
                values = self._runner.run(feed)
        except _ORT_ERRORS as exc:
            raise ModelInputError(
                f"onnxruntime failed to run the {self._described} on a batch of shape "
                f"{ {name: value.shape for name, value in feed.items()} }: {first_line(exc)}; "
                "check that the data is what the model expects (value ranges of index inputs too)"
            ) from exc
        n_out = len(self.output_names)
        batch_size = next(iter(feed.values())).shape[0] if feed else 1
        if previous is not None:
            previous.result()  # at most one batch waits to be counted
        by_name = dict(zip(self._run_outputs, values))
        mask = None if self.mask_input is None else feed[self.mask_input] != 0
        pending = self._recorder.submit(self._record, by_name, batch_size, mask)
        return values[:n_out], pending, mask

    def _record(self, values: dict[str, np.ndarray], batch_size: int, mask: np.ndarray | None) -> None:
        """Feed every capture the session output of its probe, by output name."""
        for capture in self.efficiency_layers:
            capture.record_outputs(values, batch_size, mask)

    def _stream(self, data, labels, batch_size: int | None, progress: bool | None, check_labels=None) -> Iterator[tuple]:
        """``(outputs, labels, mask)`` of each batch, recorded; the stores are flushed at the end
        (and marked complete if every batch ran). ``check_labels(labels)`` runs on each
        batch's labels before the batch does."""
        pending: Future | None = None
        finished = False
        batches = iter_batches(data, labels, self._batch_size_for(data, batch_size), len(self.inputs) == 1)
        if self.fixed_batch_size is not None:
            batches = _exact_batches(batches, self.fixed_batch_size)
        try:
            for batch in _with_progress(batches, progress):
                if check_labels is not None:
                    check_labels(batch.labels)
                outputs, pending, mask = self._run_batch(self._feed(batch.inputs), pending)
                yield outputs, batch.labels, mask
            if pending is not None:
                pending.result()
            finished = True
        finally:
            if pending is not None and not pending.done():
                pending.result()
            self.flush(complete=finished)

    def predict(self, data, batch_size: int | None = None, progress: bool | None = None, keep_outputs: bool = True):
        """Run all of ``data`` through the model, recording every probe.

        ``data``: a numpy array, a dict of arrays, an ``(x, y)`` pair, or an
        iterable of batches of those (generators, torch DataLoaders, tf.data
        datasets). Returns the model's output (a list when it has several),
        joined along the batch axis; an output with no batch axis (a scalar
        such as a loss) comes back as one value per batch. With
        ``keep_outputs=False`` only the states are recorded and None is
        returned, so memory follows the distinct states, not the outputs.
        """
        collected: list[list[np.ndarray]] = []
        for outputs, _, _ in self._stream(data, None, batch_size, progress):
            if keep_outputs:
                collected.append(outputs)
        if not keep_outputs:
            return None
        joined = [_join([batch[i] for batch in collected]) for i in range(len(self.output_names))]
        return joined[0] if len(joined) == 1 else joined

    def evaluate(self, data, labels=None, batch_size: int | None = None, progress: bool | None = None) -> float:
        """Record every probe and return the accuracy of the first output.

        Integer outputs are class ids; float outputs are class scores on their
        last axis, and their argmax is the prediction (see
        :mod:`~tensorstate_onnx.accuracy`). Labels are class ids or one-hot
        rows, given here or inside ``data`` as ``(x, y)``.
        """
        n_classes = None if self.mask_input is not None else self._n_classes()
        # Labels in memory are checked all at once before a batch runs (a refusal records
        # nothing); others (dask, zarr, inside the batches) batch by batch, before each runs.
        upfront = isinstance(labels, (np.ndarray, list, tuple))
        if upfront:
            check_class_labels(labels, n_classes)

        def check(batch_labels) -> None:
            if batch_labels is None:
                raise ModelInputError("evaluate() needs labels: pass labels=... or (x, y) batches")
            if not upfront:
                check_class_labels(batch_labels, n_classes)

        correct = total = 0
        for outputs, batch_labels, mask in self._stream(data, labels, batch_size, progress, check):
            batch_correct, batch_total = count_correct(outputs[0], batch_labels, mask)
            correct += batch_correct
            total += batch_total
        if total == 0:
            why = "no labels" if self.mask_input is None else f"every position was padding ({self.mask_input!r} was 0 everywhere)"
            raise ModelInputError(f"no prediction to score: {why}")
        return correct / total

    def _n_classes(self) -> int | None:
        """How many classes the first output scores, when its type says (float, one axis above 1)."""
        first = self.session.get_outputs()[0]
        if not ("float" in first.type or "double" in first.type) or not first.shape:
            return None
        axes = [d for d in first.shape[1:] if d != 1]
        return axes[-1] if len(axes) == 1 and isinstance(axes[-1], int) else None

    def flush(self, complete: bool = True) -> None:
        """Write buffered raw states of every probe to their stores; ``complete``
        marks them as holding the whole run (a run that failed passes False)."""
        for capture in self.efficiency_layers:
            capture.flush(complete)

    def reset_states(self) -> None:
        """Forget every probe's states (for a new evaluation in the same session)."""
        for capture in self.efficiency_layers:
            capture.reset_states()

    def __repr__(self) -> str:
        return (
            f"OnnxEfficiencyModel(probes={[p.name for p in self.probes]}, "
            f"providers={self.providers})"
        )


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + ")"


def _with_progress(batches: Iterator[Batch], progress: bool | None) -> Iterator[Batch]:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, unit="batch", desc="analyzing", leave=False)


def _join(batches: list[np.ndarray]) -> np.ndarray:
    """One output's batches joined on the batch axis; scalars stacked, one per batch."""
    if any(batch.ndim == 0 for batch in batches):
        return np.stack(batches)
    return np.concatenate(batches)


def _exact_batches(batches: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Batches of exactly ``size`` samples, for a model whose batch axis is fixed:
    larger batches are split, and a batch that does not split evenly is refused
    (padding it would record states of samples that are not in the data)."""
    for batch in batches:
        n = n_samples(batch.inputs)
        if n % size:
            raise ModelInputError(
                f"the model takes batches of exactly {size} samples, but the data gave a batch of {n}; "
                f"give a number of samples that is a multiple of {size} (batches from an iterable "
                f"must hold a multiple of {size} each)"
            )
        for start in range(0, n, size):
            inputs = (
                {name: value[start : start + size] for name, value in batch.inputs.items()}
                if isinstance(batch.inputs, dict)
                else batch.inputs[start : start + size]
            )
            yield Batch(inputs, None if batch.labels is None else batch.labels[start : start + size])
