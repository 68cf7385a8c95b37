"""ONNX graph rewriting: choose the tensors to probe and expose them as graph outputs.

The rewriter is the bridge between "which layers does the user want to watch" and
"which tensors must onnxruntime hand back". It

* finds layers by ONNX op type, ONNX node name, or the framework names that
  survive export (PyTorch module names and classes, Keras layer names and classes),
* picks the tensor entering (``"before"``) or leaving (``"after"``) each match,
* works out the neuron (channel) axis of every probed tensor,
* appends each probed tensor to the graph outputs (typed by shape inference),
  optionally quantized and bit-packed inside the graph so that only bytes leave
  the session,

while leaving the caller's model untouched and the original outputs first and
unchanged. Models over 2 GB go through files with external data, because
protobuf cannot serialize them in one piece.

Modules: :mod:`.io` (files, external data, checker, shape inference),
:mod:`.deferred` (reading a file's graph and leaving its weights in the file),
:mod:`.metadata` (the node metadata keys exporters write), :mod:`.index`
(producers and consumers of each tensor), :mod:`.scopes` (framework names and
pattern matching), :mod:`.layout` (neuron axes), :mod:`.editor` (outputs,
isolated producers, in-graph packing) and :mod:`.probes` (:func:`add_probes`,
which ties them together).
"""

from __future__ import annotations

from .deferred import has_deferred_weights, load_model_deferred, with_weights
from .io import EXTERNAL_DATA_THRESHOLD, load_model, needs_external_data, save_model
from .probes import Probe, add_probes, list_nodes, owned_copy, probe_in_place

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "needs_external_data",
    "Probe",
    "add_probes",
    "has_deferred_weights",
    "list_nodes",
    "load_model",
    "load_model_deferred",
    "owned_copy",
    "probe_in_place",
    "save_model",
    "with_weights",
]
