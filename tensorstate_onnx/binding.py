"""Run an onnxruntime session through IO binding into reused host buffers.

On CUDA the probed tensors (or the in-graph packed bytes) are the bulk of what
a run returns. ``session.run`` gives each of them a freshly allocated host
array every batch; binding them instead to host buffers that are allocated
once per input shape lets onnxruntime copy each probe straight from the device
into memory the engine reads next, with no allocation and no second copy.

The buffers of the probe outputs are reused: the arrays returned for run ``k``
are overwritten by run ``k + n_buffers``. :class:`OnnxEfficiencyModel` counts
batch ``k`` while batch ``k + 1`` runs and waits for it before starting
``k + 2``, so two buffer sets suffice. The model's own outputs are never
reused: they are returned to the caller.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnxruntime as ort

__all__ = ["ORT_DTYPES", "BoundRunner", "uses_cuda"]

_MAX_SHAPES = 4  # input shapes whose buffers are kept (a ragged last batch adds one)

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
"""numpy dtypes of onnxruntime's tensor type names, for inputs checked and outputs bound."""

# Probe outputs: float activations, or the bool/uint8 tensors of in-graph packing.
_BOUND_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bool)", "tensor(uint8)"})


def uses_cuda(session: ort.InferenceSession) -> bool:
    """Whether the session runs on the CUDA execution provider."""
    return session.get_providers()[0] == "CUDAExecutionProvider"


class BoundRunner:
    """``run(feed)`` like ``session.run``, with ``reused`` outputs written into reused host buffers.

    Args:
        session: the onnxruntime session.
        output_names: outputs to return, in order.
        reused: the names among ``output_names`` whose arrays may be
            overwritten ``n_buffers`` runs later (the probes). A graph input
            that is also an output is never bound to a buffer: onnxruntime
            does not write it.
        n_buffers: buffer sets per input shape, used in turn.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        output_names: list[str],
        reused: set[str],
        n_buffers: int = 2,
    ):
        if n_buffers < 1:
            raise ValueError(f"n_buffers must be >= 1, got {n_buffers}")
        types = {spec.name: spec.type for spec in session.get_outputs()}
        unknown = [name for name in reused if types.get(name) not in _BOUND_TYPES]
        if unknown:
            raise ValueError(f"outputs {unknown} are not tensors of a type that can be bound to host buffers")
        self.session = session
        self.output_names = list(output_names)
        inputs = {spec.name for spec in session.get_inputs()}
        self.reused = [name for name in self.output_names if name in reused and name not in inputs]
        self._dtypes = {name: ORT_DTYPES[types[name]] for name in self.reused}
        self.n_buffers = n_buffers
        # input shapes -> (buffer sets, next set to use); least recently used first
        self._buffers: OrderedDict[tuple, list] = OrderedDict()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; return the outputs in ``output_names`` order."""
        key = tuple((name, value.shape) for name, value in sorted(feed.items()))
        entry = self._buffers.get(key)
        if entry is None:
            values = self._first_run(feed)
            self._remember(key, values)
            return [values[name] for name in self.output_names]
        self._buffers.move_to_end(key)
        sets, turn = entry
        buffers = sets[turn]
        entry[1] = (turn + 1) % self.n_buffers
        binding = self._bind_inputs(feed)
        for name in self.output_names:
            if name in buffers:
                array = buffers[name]
                binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        fresh = iter(value.numpy() for value, name in zip(binding.get_outputs(), self.output_names) if name not in buffers)
        return [buffers[name] if name in buffers else next(fresh) for name in self.output_names]

    def _bind_inputs(self, feed: dict[str, np.ndarray]) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        return binding

    def _first_run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A run with onnxruntime-allocated outputs, which tells the output shapes."""
        binding = self._bind_inputs(feed)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in zip(self.output_names, binding.get_outputs())}

    def _remember(self, key: tuple, values: dict[str, np.ndarray]) -> None:
        """Allocate the buffer sets for this input shape, forgetting the least recently used shape."""
        self._buffers[key] = [
            [{name: np.empty(values[name].shape, self._dtypes[name]) for name in self.reused}
             for _ in range(self.n_buffers)],
            0,
        ]  # fmt: skip
        while len(self._buffers) > _MAX_SHAPES:
            self._buffers.popitem(last=False)
