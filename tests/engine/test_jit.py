"""Where the kernels' machine code is cached: a folder of the user's, never the package."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tensorstate_onnx
from tensorstate_onnx.engine import jit

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(tensorstate_onnx.__file__).resolve().parent

# Packs and counts states of each size class, so that every kind of kernel compiles.
COUNT = (
    "import numpy as np, tensorstate_onnx.engine as e\n"
    "from tensorstate_onnx.engine import jit\n"
    "x = np.random.default_rng(0).standard_normal((50, 100, 3)).astype(np.float32)\n"
    "for c in (5, 40, 100):\n"
    "    packed = e.pack(x[:, :c], 1)\n"
    "    counter = e.StateCounter(c)\n"
    "    counter.add(packed)\n"
    "    counter.add(packed[:7])\n"
    "    expected = np.unique(np.concatenate([packed, packed[:7]]), axis=0, return_counts=True)\n"
    "    ids, counts = counter.result(sort=True)\n"
    "    assert (ids == expected[0]).all() and (counts == expected[1]).all(), c\n"
    "print(jit.cache_dir())\n"
)


def cache_files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


def run_fresh(tmp_path: Path, **env) -> str:
    """Run COUNT in a fresh process with ``env`` (None: unset), checking that
    it writes no cache file inside the package; returns the cache folder it used."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environ["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    for key, value in env.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = str(value)
    before = cache_files(PACKAGE)
    out = subprocess.run(
        [sys.executable, "-c", COUNT], env=environ, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    after = cache_files(PACKAGE)
    assert {p for p, t in after.items() if before.get(p) != t} == set(), "numba cache files written in the package"
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_kernels_are_cached_in_the_users_cache_folder(tmp_path):
    home = tmp_path / "home"
    used = run_fresh(tmp_path, HOME=home, XDG_CACHE_HOME=tmp_path / "xdg")
    assert Path(used) == tmp_path / "xdg" / "tensorstate-onnx" / "numba"
    assert list(Path(used).rglob("*.nbi")) and list(Path(used).rglob("*.nbc"))
    # Without XDG_CACHE_HOME: ~/.cache.
    used = run_fresh(tmp_path, HOME=home, XDG_CACHE_HOME=None)
    assert Path(used) == home / ".cache" / "tensorstate-onnx" / "numba"
    assert list(Path(used).rglob("*.nbi"))


@pytest.mark.slow
def test_a_numba_cache_dir_set_by_the_user_is_used(tmp_path):
    used = run_fresh(tmp_path, NUMBA_CACHE_DIR=tmp_path / "mine", HOME=tmp_path / "home")
    assert Path(used) == tmp_path / "mine"
    assert list((tmp_path / "mine").rglob("*.nbi")) and not (tmp_path / "home").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["a file", "read-only"])
def test_an_unusable_home_falls_back_to_a_private_temporary_folder(tmp_path, how):
    home = tmp_path / "home"
    if how == "a file":  # not a folder: nothing can be made in it, not even by root
        home.write_text("")
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root writes into read-only folders (the 'a file' case covers this)")
        home.mkdir()
        home.chmod(0o500)
    try:
        used = run_fresh(tmp_path, HOME=home, XDG_CACHE_HOME=None)
    finally:
        if how == "read-only":
            home.chmod(0o700)
    assert Path(used).parent.parent == tmp_path / "tmp"
    assert Path(used).parent.name.startswith("tensorstate-onnx-")
    assert list(Path(used).rglob("*.nbi"))
    if hasattr(os, "getuid"):
        assert Path(used).parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.slow
def test_with_no_writable_folder_the_kernels_compile_uncached(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "tmp").mkdir()
    # The private temporary folder's name is taken by a file.
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    (tmp_path / "tmp" / f"tensorstate-onnx-{uid}").write_text("")
    used = run_fresh(tmp_path, HOME=blocker, XDG_CACHE_HOME=blocker)
    assert used == "None"
    assert not cache_files(tmp_path)


# ------------------------------------------------------- choosing, in process


def test_the_first_usable_folder_is_chosen(tmp_path, monkeypatch):
    environ = {"HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    monkeypatch.setattr(jit.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert jit.find_cache_dir(environ) == tmp_path / "xdg" / "tensorstate-onnx" / "numba"
    assert jit.find_cache_dir({**environ, "XDG_CACHE_HOME": "relative"}) == (
        tmp_path / "home" / ".cache" / "tensorstate-onnx" / "numba"
    )
    assert jit.find_cache_dir({**environ, "NUMBA_CACHE_DIR": str(tmp_path / "mine")}) == tmp_path / "mine"

    writable = jit._writable
    home = tmp_path / "home"
    monkeypatch.setattr(jit, "_writable", lambda folder: not folder.is_relative_to(home) and writable(folder))
    private = jit.find_cache_dir({"HOME": str(home)})
    assert private.parent == tmp_path / "tmp" / f"tensorstate-onnx-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    monkeypatch.setattr(jit, "_writable", lambda folder: False)
    assert jit.find_cache_dir(environ) is None


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="folder owners and modes are POSIX")
def test_a_temporary_folder_open_to_others_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(jit.tempfile, "tempdir", str(tmp_path))
    blocker = tmp_path / "file"  # no folder can be made in a file
    blocker.write_text("")
    environ = {"HOME": str(blocker), "XDG_CACHE_HOME": str(blocker)}
    shared = tmp_path / f"tensorstate-onnx-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    assert jit.find_cache_dir(environ) is None
    shared.chmod(0o700)
    assert jit.find_cache_dir(environ) == shared / "numba"
    # Nor a link, wherever it points.
    (shared / "numba").rmdir()
    shared.rename(tmp_path / "elsewhere")
    shared.symlink_to(tmp_path / "elsewhere")
    assert jit.find_cache_dir(environ) is None


def test_the_kernels_decorator_sets_numbas_cache_folder_only_while_decorating(monkeypatch, tmp_path):
    monkeypatch.setattr(jit, "cache_dir", lambda: tmp_path)
    before = jit.numba.config.CACHE_DIR

    @jit.kernel
    def double(x):
        return 2 * x

    @jit.kernel(inline="always")
    def triple(x):
        return 3 * x

    assert jit.numba.config.CACHE_DIR == before
    assert double(4) == 8 and triple(2) == 6
    assert list(tmp_path.rglob("*double*.nbi"))
