"""Data named on the command line: ``.npy``/``.npz`` files, zarr arrays, folders
of images and loader scripts, turned into what ``predict``/``evaluate`` take.

Arrays stay on disk until a batch is read (``.npy`` memory-mapped, zarr and
image folders read a batch at a time), so data larger than memory is fine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ._optional import import_optional
from .data import is_whole_data
from .errors import MissingFileError, ModelInputError, OptionError

__all__ = ["ImageFolder", "ImageOptions", "is_zarr", "load_array", "load_labels", "load_script", "read_data"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a zarr array or group (a folder with zarr metadata)."""
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def load_array(path: str | os.PathLike, what: str) -> np.ndarray | dict:
    """A ``.npy`` (memory-mapped), ``.npz`` (a dict) or zarr array (a dict for a group)."""
    file = Path(path)
    if is_zarr(file):
        import zarr

        try:
            opened = zarr.open(zarr.storage.LocalStore(file, read_only=True), mode="r")
        except Exception as exc:  # zarr raises several types for damaged metadata
            raise ModelInputError(f"{what} {path} is not a readable zarr array ({exc})") from None
        if isinstance(opened, zarr.Group):
            return {name: array for name, array in opened.arrays()}
        return opened
    if file.is_dir():
        raise ModelInputError(f"{what} file {path} is a directory; pass a .npy or .npz file")
    if not file.is_file():
        raise MissingFileError(f"{what} file {path} does not exist")
    with open(file, "rb") as handle:
        signature = handle.read(6)
    if not (signature.startswith(b"\x93NUMPY") or signature.startswith(b"PK")):
        raise ModelInputError(
            f"{what} file {path} is not a .npy/.npz file (it starts with neither numpy's nor zip's signature); "
            "save arrays with numpy.save or numpy.savez"
        )
    try:
        loaded = np.load(file, mmap_mode="r", allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return loaded
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ModelInputError(f"{what} file {path} is not a readable .npy/.npz file ({exc})") from None


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """One label per sample from a ``.npy`` file (or a zarr array)."""
    labels = load_array(path, "labels")
    if isinstance(labels, dict):
        raise ModelInputError("--labels takes a .npy file of one label per sample")
    return np.asarray(labels)


def read_data(data_path, labels_path, input_names: set[str]) -> tuple:
    """Inputs and labels from a data file and an optional labels file.

    A ``.npz`` (or zarr group) holds arrays named like the model inputs (and
    ``y``), or ``x`` [and ``y``], or a single array; the labels file wins over
    its ``y``.
    """
    data = load_array(data_path, "data")
    labels = None
    if isinstance(data, dict):
        if set(data) >= input_names:
            labels = data.get("y") if "y" not in input_names else None
            data = {name: data[name] for name in input_names}
        elif "x" in data:
            labels = data.get("y")
            data = data["x"]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise ModelInputError(
                f"{data_path} holds arrays {sorted(data)}; name them like the model inputs "
                f"{sorted(input_names)} or store the inputs as 'x' (and labels as 'y')"
            )
    if labels_path is not None:
        labels = load_labels(labels_path)
    return data, labels


# ---------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageOptions:
    """How pixels become model inputs: ``(pixel * scale - mean) / std`` per channel."""

    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    labels_from_folders: bool = False


class ImageFolder:
    """The images of a folder as a lazy ``[N, ...]`` float32 array laid out like the
    model input (``NCHW`` or ``NHWC``, told from where its 1 or 3 channels are),
    each resized to the input's height and width. Only the images of the batch
    being read are decoded. With ``labels_from_folders`` every sub-folder is a
    class (sorted by name: class 0, 1, ...) and ``labels`` holds their ids."""

    def __init__(self, folder: str | os.PathLike, input_shape, options: ImageOptions = ImageOptions()):
        self._image = import_optional("PIL.Image", "images", "reading a folder of images")
        folder = Path(folder)
        if options.labels_from_folders:
            loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if loose:
                raise ModelInputError(
                    f"--labels-from-folders: {folder} holds images outside any class folder ({', '.join(sorted(loose)[:3])}"
                    f"{', ...' if len(loose) > 3 else ''}); with labels from folders every image must be in the "
                    "sub-folder of its class: move them there or remove them"
                )
            classes = [_images_in(p) for p in sorted(p for p in folder.iterdir() if p.is_dir())]
            self.files = [f for images in classes for f in images]
            self.labels = np.array([k for k, images in enumerate(classes) for _ in images], dtype=np.int64)
            if not classes:
                raise ModelInputError(f"--labels-from-folders: {folder} has no sub-folders (one per class)")
        else:
            self.files, self.labels = _images_in(folder), None
        if not self.files:
            raise ModelInputError(
                f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "pass a folder of images, a .npy/.npz file or a zarr array"
            )
        self._layout, self._size, channels = _image_layout(input_shape)
        self._mode = "L" if channels == 1 else "RGB"
        self._scale = np.float32(options.scale)
        self._mean = _per_channel(options.mean, channels, "--mean")
        self._std = _per_channel(options.std, channels, "--std")
        if not (np.isfinite(self._scale) and self._scale != 0):
            raise OptionError(f"--scale must be a finite number other than 0, got {options.scale}")
        if not np.all(np.isfinite(self._mean)):
            raise OptionError(f"--mean must be finite numbers, got {options.mean}")
        if not np.all(np.isfinite(self._std) & (self._std > 0)):
            raise OptionError(f"--std must be finite numbers above 0, got {options.std}")
        height, width = self._size
        body = (channels, height, width) if self._layout == "NCHW" else (height, width, channels)
        self.shape = (len(self.files), *body)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index) -> np.ndarray:
        files = self.files[index] if isinstance(index, slice) else [self.files[index]]
        batch = np.stack([self._load(f) for f in files]) if files else np.empty((0, *self.shape[1:]), np.float32)
        return batch if isinstance(index, slice) else batch[0]

    def _load(self, file: Path) -> np.ndarray:
        try:
            with self._image.open(file) as image:
                pixels = image.convert(self._mode).resize(self._size[::-1], self._image.Resampling.BILINEAR)
                hwc = np.asarray(pixels, dtype=np.float32).reshape(self._size[0], self._size[1], -1)
        except (OSError, ValueError) as exc:
            raise ModelInputError(f"image {file} cannot be read ({exc}); remove it or replace it") from None
        hwc = (hwc * self._scale - self._mean) / self._std
        return np.ascontiguousarray(hwc.transpose(2, 0, 1) if self._layout == "NCHW" else hwc)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_layout(shape) -> tuple[str, tuple[int, int], int]:
    """``(layout, (height, width), channels)`` of an image input ``[N, C, H, W]`` or ``[N, H, W, C]``."""
    dims = list(shape or ())
    if len(dims) == 4 and dims[1] in (1, 3) and all(isinstance(d, int) for d in dims[2:]):
        return "NCHW", (dims[2], dims[3]), dims[1]
    if len(dims) == 4 and dims[3] in (1, 3) and all(isinstance(d, int) for d in dims[1:3]):
        return "NHWC", (dims[1], dims[2]), dims[3]
    raise ModelInputError(
        f"a folder of images needs a model input of shape [N, C, H, W] or [N, H, W, C] with 1 or 3 "
        f"channels and a fixed height and width; this model's input is {dims}"
    )


def _per_channel(values: tuple[float, ...], channels: int, option: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise OptionError(f"{option} takes 1 or {channels} comma-separated numbers, got {len(values)}")
    return np.broadcast_to(np.asarray(values, np.float32), (channels,)).copy()


# ---------------------------------------------------------------------- loader scripts


def load_script(spec: str) -> Iterable:
    """The batches that ``FILE.py[:function]`` (default function ``load_data``) gives.

    The function returns the data (an array, a dict of arrays, one per model
    input, or an ``(x, y)`` tuple), given back as it is so that ``predict``
    and ``evaluate`` split it into batches (:func:`~.data.is_whole_data`), or an
    iterable of batches (a list, a generator), whose batches are used as
    they come. A failure of the script's own code, an exception or
    ``sys.exit()``, while it is imported, called or gives its batches, is
    the script's: a :class:`ModelInputError` naming it.
    """
    file, _, name = spec.partition(":")
    name = name or "load_data"
    path = Path(file)
    if not path.is_file():
        raise MissingFileError(f"data loader script {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_tensorstate_loader_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.absolute().parent))  # the script may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise ModelInputError(f"data loader script {file} failed to run: {_script_failure(exc)}") from exc
    finally:
        sys.path.remove(str(path.absolute().parent))
    function: Callable | None = getattr(module, name, None)
    if not callable(function):
        raise ModelInputError(f"data loader script {file} has no function {name!r}; define it or name it as FILE.py:function")
    where = f"data loader script {file}, function {name}()"
    try:
        result = function()
    except (Exception, SystemExit) as exc:
        raise ModelInputError(f"{where} failed: {_script_failure(exc)}") from exc
    return _script_batches(result, where)


def _script_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _script_batches(result, where: str) -> Iterable:
    """``result`` of a loader function: whole data as it is, an iterable of
    batches as one whose failures name the script."""
    if is_whole_data(result) or isinstance(result, (list, tuple)):
        return result
    try:
        iterator = iter(result)
    except TypeError:
        raise ModelInputError(
            f"{where} returned {type(result).__name__}; return a batch (an array, a dict of arrays, an (x, y) "
            "tuple) or an iterable of batches"
        ) from None
    return _checked_batches(iterator, where)


def _checked_batches(iterator, where: str) -> Iterable:
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (Exception, SystemExit) as exc:
            raise ModelInputError(f"{where} failed while giving its batches: {_script_failure(exc)}") from exc
        yield batch
