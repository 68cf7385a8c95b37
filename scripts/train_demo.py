"""Train the demo LeNet-5 on scikit-learn's digits and export it to ONNX.

Writes ``lenet5_digits.onnx`` and ``digits_test.npz`` (the held-out split) into
``--out`` (default: the package's ``tensorstate_onnx/demo``). Everything is
seeded and torch runs single-threaded with deterministic kernels, so a rerun on
the same software versions gives the same model. Needs torch and scikit-learn;
nothing is downloaded (``load_digits`` ships with scikit-learn).

Usage: ``python scripts/train_demo.py [--out DIR] [--epochs N] [--seed S]``
"""

from __future__ import annotations

import argparse
import io
import pathlib
import random
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # models/ is in the repository, not installed

from models.torch_models import LeNet5, lenet5

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "tensorstate_onnx" / "demo"
MODEL_FILE = "lenet5_digits.onnx"
TEST_DATA_FILE = "digits_test.npz"
OPSET = 17
MIN_ACCURACY = 0.95
PARITY_ATOL = 1e-4
# Op types the demo graph must consist of: BatchNormalization kept (not folded
# into Conv) and no Identity nodes from deduplicated initializers.
EXPECTED_OPS = {"Conv", "Elu", "BatchNormalization", "MaxPool", "Flatten", "Gemm"}


def digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as float32 ``[N, 1, 28, 28]`` in [0, 1] and int64 labels.

    Each 8x8 pixel (0..16) becomes a 3x3 block (24x24), zero-padded by 2 on every
    side, so LeNet-5's MNIST-sized input fits without interpolation.
    """
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    images = np.repeat(np.repeat(images, 3, axis=1), 3, axis=2)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return images[:, None, :, :], digits.target.astype(np.int64)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and make torch single-threaded and deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, batch_size: int = 32
) -> None:
    """Train with Adam and cross-entropy on shuffled mini-batches."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}")
    model.eval()


def export_onnx(model: LeNet5) -> onnx.ModelProto:
    """Export ``model`` (in eval mode) to a self-contained ONNX model.

    The legacy TorchScript exporter is used on purpose: with
    ``TrainingMode.PRESERVE`` and no constant folding it keeps each
    BatchNormalization as its own node (instead of folding it into the preceding
    Conv) and names nodes after modules (``/conv1/Conv``), so probes can target
    the same layers as the torch hooks. Exporting to memory guarantees a single
    file with no external data.
    """
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = (
        "LeNet-5 trained on scikit-learn digits upscaled to 28x28 (scripts/train_demo.py)."
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_graph(proto: onnx.ModelProto) -> None:
    """Fail unless the graph has unfolded BatchNorms and module-named nodes."""
    ops = {n.op_type for n in proto.graph.node}
    if ops != EXPECTED_OPS:
        sys.exit(f"unexpected op types in the export: {sorted(ops)} (want {sorted(EXPECTED_OPS)})")
    names = {n.name for n in proto.graph.node}
    wanted = {f"/conv{i}/Conv" for i in (1, 2, 3)}
    wanted |= {f"/bn{i}/BatchNormalization" for i in (1, 2, 3)}
    if not wanted <= names:
        sys.exit(f"exported node names lack {sorted(wanted - names)}; got {sorted(names)}")


def main(argv: list[str] | None = None) -> int:
    """Train, export, verify and write the demo files; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, init and shuffling")
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    x, y = digits_28x28()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=args.seed
    )
    print(f"train {len(x_train)}, test {len(x_test)} digits")

    model = lenet5()
    started = time.perf_counter()
    train(model, x_train, y_train, args.epochs, args.seed)
    print(f"trained in {time.perf_counter() - started:.1f} s")

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()

    proto = export_onnx(model)
    check_graph(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": x_test})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    if max_diff > PARITY_ATOL:
        sys.exit(f"onnxruntime differs from torch by {max_diff:.2e} > {PARITY_ATOL:.0e}")

    accuracy = float((ort_logits.argmax(axis=1) == y_test).mean())
    if accuracy < MIN_ACCURACY:
        sys.exit(f"test accuracy {accuracy:.4f} < {MIN_ACCURACY}; not writing the demo files")

    args.out.mkdir(parents=True, exist_ok=True)
    model_file = args.out / MODEL_FILE
    onnx.save_model(proto, model_file)
    # Pixels are multiples of 1/16, so float16 stores them exactly at half the size.
    np.savez_compressed(args.out / TEST_DATA_FILE, x=x_test.astype(np.float16), y=y_test)

    print("nodes:", ", ".join(n.name for n in proto.graph.node))
    print(f"onnxruntime vs torch max |diff|: {max_diff:.2e}")
    print(f"wrote {model_file} ({model_file.stat().st_size} bytes) and {args.out / TEST_DATA_FILE}")
    print(f"test accuracy: {accuracy:.4f} ({len(y_test)} digits)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
