"""The wheel installs exactly one top-level package, with the converters inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a clean copy: a build/ folder left by an earlier build would
    # put modules in the wheel that the package list no longer names.
    source = tmp_path_factory.mktemp("source") / "repo"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (built,) = out.glob("tensorstate_onnx-*.whl")
    return built


def test_the_wheel_holds_only_tensorstate_onnx(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"tensorstate_onnx"}
    for module in ("__init__.py", "torch_export.py", "keras_export.py"):
        assert f"tensorstate_onnx/converters/{module}" in names
    assert not [name for name in names if name.startswith("tensorstate_onnx/models")]
    assert "tensorstate_onnx/demo/lenet5_digits.onnx" in names
    # every module of the package, subpackages included (they are listed by hand in pyproject.toml)
    modules = {path.relative_to(REPO).as_posix() for path in (REPO / "tensorstate_onnx").rglob("*.py")}
    assert modules and modules <= set(names), sorted(modules - set(names))


def test_converters_import_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    code = (
        "import importlib.util, tensorstate_onnx, tensorstate_onnx.converters as c;"
        "print(tensorstate_onnx.__file__); print(c.__file__); print(c.from_torch.__module__);"
        "print(importlib.util.find_spec('converters'), importlib.util.find_spec('models'))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    package, converters, module, leaked = out.stdout.splitlines()
    assert Path(package).is_relative_to(site) and Path(converters).is_relative_to(site)
    assert module == "tensorstate_onnx.converters.torch_export"
    assert leaked == "None None"
