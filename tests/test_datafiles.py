"""Tests of tensorstate_onnx.datafiles: zarr arrays, folders of images and loader
scripts as data, checked against the arrays they were written from."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tensorstate_onnx.data import is_whole_data
from tensorstate_onnx.datafiles import ImageFolder, ImageOptions, load_array, load_script, read_data
from tensorstate_onnx.errors import MissingFileError, ModelInputError, OptionError

Image = pytest.importorskip("PIL.Image")


def _write_images(folder, pixels: np.ndarray, mode: str) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(pixels):
        path = folder / f"img{k:02d}.png"
        Image.fromarray(image.squeeze(-1) if mode == "L" else image, mode=mode).save(path)
        paths.append(path)
    return paths


def test_zarr_arrays_and_groups_read_like_npy_and_npz(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    y = np.arange(10)
    zarr.save_array(str(tmp_path / "x.zarr"), x)
    zarr.save_group(str(tmp_path / "xy.zarr"), x=x, y=y)
    assert np.array_equal(load_array(tmp_path / "x.zarr", "data")[2:5], x[2:5])
    data, labels = read_data(tmp_path / "xy.zarr", None, {"input"})
    assert np.array_equal(data[:], x) and np.array_equal(labels[:], y)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_an_image_folder_is_a_lazy_array_laid_out_like_the_input(tmp_path, layout):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)
    _write_images(tmp_path / "images", pixels, "RGB")
    shape = ["N", 3, 6, 4] if layout == "NCHW" else ["N", 6, 4, 3]
    options = ImageOptions(scale=1 / 255, mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 2.0))
    folder = ImageFolder(tmp_path / "images", shape, options)
    want = (pixels / np.float32(255) - np.float32([0.5, 0.25, 0.0])) / np.float32([0.5, 0.5, 2.0])
    want = want.transpose(0, 3, 1, 2) if layout == "NCHW" else want
    assert folder.shape == (5, *want.shape[1:]) and folder.labels is None
    np.testing.assert_allclose(folder[1:4], want[1:4], atol=1e-6)
    np.testing.assert_allclose(folder[0], want[0], atol=1e-6)


def test_images_are_resized_to_the_input_and_labelled_by_folder(tmp_path):
    rng = np.random.default_rng(2)
    _write_images(tmp_path / "data" / "cat", rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8), "L")
    _write_images(tmp_path / "data" / "dog", rng.integers(0, 256, (3, 16, 12, 1), dtype=np.uint8), "L")
    folder = ImageFolder(tmp_path / "data", ["N", 1, 4, 4], ImageOptions(labels_from_folders=True))
    assert folder.shape == (5, 1, 4, 4) and folder.labels.tolist() == [0, 0, 1, 1, 1]
    with Image.open(tmp_path / "data" / "dog" / "img01.png") as image:
        resized = np.asarray(image.resize((4, 4), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(folder[3][0], resized, atol=1e-6)


def test_image_folder_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelInputError, match="holds no images"):
        ImageFolder(tmp_path / "empty", ["N", 3, 4, 4])
    _write_images(tmp_path / "ok", np.zeros((1, 4, 4, 3), np.uint8), "RGB")
    with pytest.raises(ModelInputError, match=r"needs a model input of shape \[N, C, H, W\].*\['N', 10\]"):
        ImageFolder(tmp_path / "ok", ["N", 10])
    with pytest.raises(OptionError, match="--mean takes 1 or 3 comma-separated numbers, got 2"):
        ImageFolder(tmp_path / "ok", ["N", 3, 4, 4], ImageOptions(mean=(0.1, 0.2)))
    (tmp_path / "ok" / "broken.png").write_bytes(b"not a png")
    folder = ImageFolder(tmp_path / "ok", ["N", 3, 4, 4])
    with pytest.raises(ModelInputError, match=r"image .*broken.png cannot be read"):
        folder[:]


def test_loader_scripts(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n    for k in range(3):\n        yield np.full((2, 4), k, np.float32)\n"
        "def pairs():\n    return [(np.ones((2, 4), np.float32), np.array([0, 1]))]\n"
    )
    assert [b[0, 0] for b in load_script(str(script))] == [0, 1, 2]
    assert load_script(f"{script}:pairs")[0][1].tolist() == [0, 1]
    with pytest.raises(ModelInputError, match="has no function 'nothing'"):
        load_script(f"{script}:nothing")
    with pytest.raises(MissingFileError, match="does not exist"):
        load_script(str(tmp_path / "missing.py"))
    (tmp_path / "broken.py").write_text("raise RuntimeError('no data today')\n")
    with pytest.raises(ModelInputError, match="failed to run: RuntimeError: no data today"):
        load_script(str(tmp_path / "broken.py"))
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(ModelInputError, match=r"exits.py failed to run: it called sys.exit\(0\)"):
        load_script(str(tmp_path / "exits.py"))


def test_a_loader_returning_its_data_whole_gives_it_as_it_is(tmp_path):
    script = tmp_path / "one.py"
    script.write_text(
        "import numpy as np\n"
        "x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.array([0, 1])\n"
        "def array():\n    return x\n"
        "def pair():\n    return x, y\n"
        "def named():\n    return {'input': x}\n"
        "def two_batches():\n    return [x, x + 1]\n"
    )
    batch = load_script(f"{script}:array")
    assert batch.shape == (2, 4) and is_whole_data(batch)
    bx, by = load_script(f"{script}:pair")
    assert bx.shape == (2, 4) and by.tolist() == [0, 1]
    batch = load_script(f"{script}:named")
    assert list(batch) == ["input"] and is_whole_data(batch)
    assert [b[0, 0] for b in load_script(f"{script}:two_batches")] == [0, 1]


def test_a_loader_failing_in_its_own_code_names_the_script(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(
        "import sys\nimport numpy as np\n"
        "def raises():\n    raise RuntimeError('disk gone')\n"
        "def exits():\n    sys.exit(3)\n"
        "def nothing():\n    return None\n"
        "def needs_an_argument(path):\n    return []\n"
        "def raises_mid():\n    yield np.zeros((2, 4), np.float32)\n    raise OSError('connection reset')\n"
    )
    cases = {
        "raises": r"function raises\(\) failed: RuntimeError: disk gone",
        "exits": r"function exits\(\) failed: it called sys.exit\(3\)",
        "nothing": r"function nothing\(\) returned NoneType; return a batch .* or an iterable of batches",
        "needs_an_argument": r"function needs_an_argument\(\) failed: TypeError: .*missing 1 required positional argument",
    }
    for name, message in cases.items():
        with pytest.raises(ModelInputError, match=message):
            load_script(f"{script}:{name}")
    batches = iter(load_script(f"{script}:raises_mid"))
    assert next(batches).shape == (2, 4)
    with pytest.raises(ModelInputError, match=r"raises_mid\(\) failed while giving its batches: OSError: connection reset"):
        next(batches)
