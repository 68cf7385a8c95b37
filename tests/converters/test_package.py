"""The converters package: its names, and that importing it imports no framework."""

import subprocess
import sys


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, tensorstate_onnx, tensorstate_onnx.converters as c\n"
        "assert set(c.__all__) == {'from_torch', 'from_keras'}\n"
        "loaded = [m for m in ('torch', 'tensorflow', 'keras', 'tf2onnx') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
