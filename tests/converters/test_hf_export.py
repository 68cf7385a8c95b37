"""from_torch on Hugging Face transformers as users build them (random weights from
small configs, no download): the key/value cache is off while exporting, token
inputs get a dynamic sequence axis, and the native hooks and the ONNX path record
the same states of the MLP activations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


def _gpt2(transformers):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval(), ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]


def _bert(transformers):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).eval(), ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_transformers_export_with_any_sequence_length_and_match_native_hooks(torch, transformers, arch):
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    torch.manual_seed(0)
    model, probes = (_gpt2 if arch == "gpt2" else _bert)(transformers)
    use_cache = getattr(model.config, "use_cache", None)
    gen = torch.Generator().manual_seed(1)
    example = {"input_ids": torch.randint(0, 100, (2, 16), generator=gen)}
    if arch == "bert":
        example["attention_mask"] = torch.ones(2, 16, dtype=torch.int64)
    exported = from_torch(model, example)
    assert getattr(model.config, "use_cache", None) == use_cache, "the model's config is restored"
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in exported.graph.input] == [["batch", "sequence"]] * len(example)
    ids = torch.randint(0, 100, (3, 9), generator=gen)  # another batch size and length than exported
    feed = {"input_ids": ids} if arch == "gpt2" else {"input_ids": ids, "attention_mask": torch.ones(3, 9, dtype=torch.int64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no axis is guessed, on either path
        onnx_model = OnnxEfficiencyModel(exported, probes, providers="cpu", keep_states=True)
        outputs = onnx_model.predict({k: v.numpy() for k, v in feed.items()}, batch_size=3)
        first = outputs[0] if isinstance(outputs, list) else outputs
        attach_hooks(model, probes)
        with torch.no_grad():
            expected = model(**feed)[0].numpy()
    try:
        np.testing.assert_allclose(first, expected, atol=1e-4)
        native = {hook.name: hook for hook in model.efficiency_layers}
        for capture in onnx_model.efficiency_layers:
            hook = native[capture.name]
            assert capture.channel_axis == hook.channel_axis == 2
            assert capture.state_count == hook.state_count == 3 * 9  # one state per token
            assert capture.n_neurons == hook.n_neurons
            flipped = np.count_nonzero((capture.states[:] != hook.states[:]).any(axis=1))
            assert flipped <= 1, (capture.name, flipped)
    finally:
        remove_state_layers(model)


@pytest.mark.slow
def test_gpt2_attention_is_one_module_with_its_own_input_on_both_paths(torch, transformers):
    """GPT-2's attention splits its fused query/key/value projection with a Split the
    exporter leaves without module metadata, and ends in a view that c_proj's own view
    follows: the ONNX probes of ``attn`` and ``attn.c_proj`` are one call each on the
    tensors the native hooks see (32 neurons, one state per token)."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    torch.manual_seed(0)
    model, _ = _gpt2(transformers)
    probes = ["transformer.h.0.attn", "transformer.h.0.attn.c_proj"]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (3, 9), generator=gen)
    onnx_model = OnnxEfficiencyModel(from_torch(model, {"input_ids": ids[:2]}), probes, method="both",
                                     providers="cpu", keep_states=True)  # fmt: skip
    assert all(len(probe.each_call()) == 1 for probe in onnx_model.probes)
    onnx_model.predict({"input_ids": ids.numpy()}, batch_size=3)
    attach_hooks(model, probes, method="both")
    try:
        with torch.no_grad():
            model(input_ids=ids)
        native = {hook.name: hook for hook in model.efficiency_layers}
        assert sorted(native) == sorted(capture.name for capture in onnx_model.efficiency_layers)
        for capture in onnx_model.efficiency_layers:
            hook = native[capture.name]
            assert (capture.n_neurons, capture.state_count) == (hook.n_neurons, hook.state_count) == (32, 27), capture.name
            flipped = np.count_nonzero((capture.states[:] != hook.states[:]).any(axis=1))
            assert flipped <= 1, (capture.name, flipped)
    finally:
        remove_state_layers(model)


@pytest.mark.slow
def test_padded_tokens_are_left_out_alike_on_both_paths(torch, transformers):
    from tensorstate_onnx import build_efficiency_model
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import remove_state_layers

    torch.manual_seed(0)
    model, probes = _bert(transformers)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (4, 10), generator=gen)
    mask = (torch.arange(10)[None, :] < torch.tensor([[10], [7], [3], [5]])).long()  # right padding
    exported = from_torch(model, {"input_ids": ids[:2], "attention_mask": mask[:2]})
    masked = OnnxEfficiencyModel(exported, probes, providers="cpu", keep_states=True, mask_input="attention_mask")
    masked.predict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, batch_size=2)
    whole = OnnxEfficiencyModel(exported, probes, providers="cpu", keep_states=True)
    whole.predict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, batch_size=2)
    native = build_efficiency_model(model, probes, mask_input="attention_mask")
    try:
        with torch.no_grad():
            for k in (0, 2):
                native(input_ids=ids[k : k + 2], attention_mask=mask[k : k + 2])
        hooks = {hook.name: hook for hook in native.efficiency_layers}
        real = mask.numpy().astype(bool).reshape(-1)
        for capture, full in zip(masked.efficiency_layers, whole.efficiency_layers, strict=True):
            assert capture.state_count == real.sum() and full.state_count == real.size
            # Exactly the unpadded rows of the unmasked run, in order.
            assert np.array_equal(capture.states[:], full.states[:][real])
            hook = hooks[capture.name]
            assert hook.state_count == capture.state_count
            assert np.count_nonzero((hook.states[:] != capture.states[:]).any(axis=1)) <= 1
            assert capture.counts(index=[2]).sum() == 3  # the third sample has 3 real tokens
    finally:
        remove_state_layers(native)


@pytest.mark.slow
def test_gpt2_op_type_probes_name_module_op_and_position(torch, transformers):
    """MatMul/Gemm matched by op type in an exported GPT-2: each probe says which tensor
    (``transformer.h.0.attn/MatMul#2``: the second MatMul of that module), names are
    unique and the same on a second rewrite, and module matches keep their names."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.graph import add_probes

    torch.manual_seed(0)
    model, _ = _gpt2(transformers)
    exported = from_torch(model, {"input_ids": torch.randint(0, 100, (2, 16))})
    _, probes = add_probes(exported, ["MatMul", "Gemm"])
    names = [p.name for p in probes]
    assert len(set(names)) == len(names) == len({p.tensor_name for p in probes})
    for layer in (0, 1):
        attn = [p for p in probes if p.name.startswith(f"transformer.h.{layer}.attn/")]
        assert [(p.name, p.op_type) for p in attn] == [
            (f"transformer.h.{layer}.attn/MatMul#1:after", "MatMul"),
            (f"transformer.h.{layer}.attn/MatMul#2:after", "MatMul"),
        ]
        assert f"transformer.h.{layer}.mlp.c_fc/Gemm:after" in names
    _, again = add_probes(exported, ["MatMul", "Gemm"])
    assert [p.name for p in again] == names
    _, by_module = add_probes(exported, ["transformer.h.0.attn", "transformer.h.0.mlp.act"])
    assert sorted(p.name for p in by_module) == ["transformer.h.0.attn:after", "transformer.h.0.mlp.act:after"]


def test_an_encoder_decoder_without_decoder_inputs_is_an_input_error(torch, transformers):
    """A T5 model given only input_ids fails in its own forward; the error says so and
    lists the inputs it takes (decoder_input_ids among them) instead of blaming export."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.errors import OptionError

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=100, decoder_start_token_id=0)
    model = transformers.T5Model(config).eval()
    with pytest.raises(OptionError, match=r"T5Model fails on example_inputs before any export.*decoder_input_ids"):
        from_torch(model, {"input_ids": torch.randint(0, 100, (2, 8))})
