"""What a shard task runs: the model on the worker, the batches of a callable shard, the shard's capture."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("distributed")

from tensorstate_onnx import ModelFileError, ModelInputError, demo  # noqa: E402
from tensorstate_onnx.distributed import analyze_sharded  # noqa: E402
from tensorstate_onnx.distributed.worker import _BatchWatch  # noqa: E402
from tensorstate_onnx.graph import save_model  # noqa: E402
from models.onnx_models import mobilenet_v2_small_onnx  # noqa: E402
from tensorstate_onnx.runtime import OnnxEfficiencyModel  # noqa: E402


@pytest.mark.distributed
@pytest.mark.parametrize("pack_in_graph, as_path", [pytest.param(False, False, marks=pytest.mark.slow), (True, True)])
def test_mobilenet_all_convs_match_single_process(client, tmp_path, assert_same_counts, stored_rows, pack_in_graph, as_path):
    proto = mobilenet_v2_small_onnx()
    model = save_model(proto, tmp_path / "mobilenet.onnx") if as_path else proto  # a proto goes as bytes
    x = np.random.default_rng(1).normal(size=(20, 3, 96, 96)).astype(np.float32)
    expected = OnnxEfficiencyModel(proto, "Conv", providers="cpu", pack_in_graph=pack_in_graph, keep_states=True)
    expected.predict(x, batch_size=8)
    result = analyze_sharded(
        model, x, "Conv", client=client, shard_size=7, batch_size=4, pack_in_graph=pack_in_graph,
        storage_path=tmp_path / "states",
    )  # fmt: skip
    assert len(result.model.efficiency_layers) == 22
    assert_same_counts(expected, result.model)
    for capture in expected.efficiency_layers:
        assert np.array_equal(stored_rows(tmp_path / "states", capture.name), capture.states[:])


@pytest.mark.distributed
def test_shards_of_mismatched_shape_name_the_shard(client, digits, probes, batches):
    x, y = digits
    source = batches(x, y, size=120, wrong_shape={1})
    with pytest.raises(ValueError, match=r"shard 1\b.*\(\d+, 1, 32, 32\)"):
        analyze_sharded(demo.model_path(), source, n_shards=3, client=client, **probes)


@pytest.mark.distributed
def test_model_the_workers_cannot_read(client, digits, probes, tmp_path):
    x, _ = digits
    missing = tmp_path / "elsewhere" / "model.onnx"
    with pytest.raises(ModelFileError, match=re.escape(str(missing))) as info:
        analyze_sharded(
            demo.model_path(), x, client=client, worker_model_path=missing, shard_size=120, **probes
        )
    assert "shard" in str(info.value) and "worker pid" in str(info.value)


def test_batch_watch_counts_samples_and_refuses_mixed_shapes():
    x = np.zeros((10, 3), np.float32)
    labels = np.arange(10)
    watch = _BatchWatch(iter([(x[:4], labels[:4]), [x[4:], labels[4:]]]), "shard 7")
    assert watch.labelled and not watch.empty
    assert [len(item[0]) for item in watch] == [4, 6]
    assert watch.samples == 10 and watch.shape == (3,)

    assert _BatchWatch(iter([]), "shard 7").empty
    mixed = _BatchWatch(iter([x, np.zeros((2, 4), np.float32)]), "shard 7")
    with pytest.raises(ModelInputError, match=r"shard 7 mixes samples of shape \(3,\) and \(4,\)"):
        list(mixed)
    with pytest.raises(ModelInputError, match="ambiguous"):
        list(_BatchWatch(iter([(x, x, x, x)]), "shard 7"))
    with pytest.raises(ModelInputError, match=r"\(x, y, sample_weight\) batches are not supported"):
        list(_BatchWatch(iter([(x, x, x)]), "shard 7"))
