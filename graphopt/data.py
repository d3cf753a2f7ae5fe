"""Samples of a model's inputs (calibration, agreement, fine-tuning), read and checked once.

What a user may give: a `.npy` (the model's one input), a `.npz` (one array per input name, and
optionally labels under `y`), a folder of such files, or, for a model with one image input, a
folder of PNG/JPEG files (class sub-folders give labels). The library also takes an array, a dict
of arrays, an iterable of feeds, or anything with `as_numpy_iterator` (a `tf.data.Dataset`).
Every problem is an InputError that names the source. No framework is imported here: the
backends describe their inputs as `InputSpec`s.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from graphopt.errors import InputError, Notice

PREPROCESS = ("0..1", "-1..1", "imagenet", "none")
DEFAULT_PREPROCESS = "0..1"
"""Pixels divided by 255: what most networks trained by their users expect (`x / 255`).
keras.applications' EfficientNet rescales inside the model and wants `none` (0..255); MobileNet
wants `-1..1`; ImageNet models exported from PyTorch want `imagenet`."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_KEYS = ("y", "labels")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (batch first, None where open) and NumPy dtype."""

    name: str
    shape: tuple
    dtype: str = "float32"

    @property
    def channels_last(self) -> bool:
        """Image layout: NHWC unless the second axis looks like the channels and the last not."""
        if len(self.shape) != 4:
            return True
        return not (self.shape[1] in (1, 3, 4) and self.shape[-1] not in (1, 3, 4))


@dataclass
class Samples:
    """Samples on the first axis, one array per model input, optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "data"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index) -> Samples:
        labels = None if self.labels is None else self.labels[index]
        return Samples({k: v[index] for k, v in self.inputs.items()}, labels, self.source)

    def split(self, held_out: float, seed: int = 0) -> tuple[Samples, Samples]:
        """(fit part, held-out part): a seeded shuffle, at least one sample in each."""
        n = len(self)
        if n < 2:
            raise InputError(f"{self.source}: {n} sample; at least 2 are needed to hold some out")
        order = np.random.default_rng(seed).permutation(n)
        cut = min(n - 1, max(1, round(n * held_out)))
        return self.take(np.sort(order[cut:])), self.take(np.sort(order[:cut]))

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}


def load_samples(
    data,
    specs: list[InputSpec],
    *,
    preprocess: str = DEFAULT_PREPROCESS,
    limit: int | None = None,
) -> Samples:
    """Read `data` (a path or an in-memory form, see the module) and check it against `specs`."""
    if preprocess not in PREPROCESS:
        raise InputError(f"preprocess must be one of {', '.join(PREPROCESS)}, not '{preprocess}'")
    if isinstance(data, Samples):
        samples = data
    elif isinstance(data, (str, os.PathLike)):
        samples = _from_path(os.fspath(data), specs, preprocess)
    else:
        samples = _from_memory(data, specs)
    if limit is not None:
        samples = samples.take(slice(0, limit))
    return check(samples, specs)


def check(samples: Samples, specs: list[InputSpec]) -> Samples:
    """Names, ranks, fixed dims, dtypes, finiteness, equal counts; cast floats to the model's."""
    src = samples.source
    names = [s.name for s in specs]
    missing = [n for n in names if n not in samples.inputs]
    extra = [n for n in samples.inputs if n not in names]
    if missing or extra:
        raise InputError(
            f"{src}: inputs {sorted(samples.inputs)} do not match the model's {names}"
            + (f" (missing {missing})" if missing else "")
        )
    out = {}
    for spec in specs:
        array = np.asarray(samples.inputs[spec.name])
        out[spec.name] = _checked(array, spec, src)
    counts = {len(a) for a in out.values()}
    if len(counts) != 1:
        raise InputError(f"{src}: inputs hold different numbers of samples {sorted(counts)}")
    labels = samples.labels
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != counts.pop():
            raise InputError(f"{src}: {len(labels)} labels for {len(out[names[0]])} samples")
    return Samples(out, labels, src)


def _checked(array: np.ndarray, spec: InputSpec, src: str) -> np.ndarray:
    what = f"{src}: input '{spec.name}'"
    if not spec.shape:
        raise InputError(
            f"{what} is a scalar in the model, so it has no axis of samples: such a model "
            "cannot be fed sample by sample"
        )
    if array.ndim == 0:
        raise InputError(f"{what} is a single value; give samples on the first axis")
    if array.size == 0:
        raise InputError(f"{what} is empty")
    if array.ndim != len(spec.shape):
        raise InputError(
            f"{what} has shape {array.shape}, the model wants {_shape_text(spec.shape)}"
        )
    for got, want in zip(array.shape[1:], spec.shape[1:]):
        if want is not None and got != want:
            raise InputError(
                f"{what} has shape {array.shape}, the model wants {_shape_text(spec.shape)}"
            )
    return _cast(array, np.dtype(spec.dtype), what)


def _cast(array: np.ndarray, want: np.dtype, what: str) -> np.ndarray:
    """`array` in the model's dtype: a cast that keeps every value (float64 -> float32 within
    range, integers a float holds exactly, a wider integer type) with a notice, else refused."""
    got = array.dtype
    if got == want:
        if np.issubdtype(want, np.floating) and not np.isfinite(array).all():
            raise InputError(f"{what} holds NaN or infinite values")
        return array
    numeric = np.issubdtype(got, np.floating) or np.issubdtype(got, np.integer)
    if not numeric or np.issubdtype(got, np.bool_):
        raise InputError(f"{what} has dtype {got}, the model wants {want}")
    if np.issubdtype(want, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{what} holds NaN or infinite values")
        with np.errstate(over="ignore"):
            cast = array.astype(want)
        if not np.isfinite(cast).all():
            raise InputError(f"{what} has values beyond the range of {want}, the model's dtype")
        if np.issubdtype(got, np.integer):
            exact = 2 ** (np.finfo(want).nmant + 1)
            if np.abs(array).max() > exact:
                raise InputError(
                    f"{what} has integers beyond {exact:,}, which {want} (the model's dtype) "
                    "does not hold exactly"
                )
        warnings.warn(f"{what}: {got} values cast to {want}, the model's dtype", Notice, 2)
        return cast
    if np.issubdtype(want, np.integer) and np.issubdtype(got, np.integer):
        info = np.iinfo(want)
        if array.min() < info.min or array.max() > info.max:
            raise InputError(f"{what} has values beyond the range of {want}, the model's dtype")
        warnings.warn(f"{what}: {got} values cast to {want}, the model's dtype", Notice, 2)
        return array.astype(want)
    raise InputError(f"{what} has dtype {got}, the model wants {want} (a cast would lose values)")


def _shape_text(shape) -> str:
    dims = ["N"] + ["?" if d is None else str(d) for d in shape[1:]]
    return f"({', '.join(dims)})"


# ---- from files -----------------------------------------------------------------------------


def _from_path(path: str, specs: list[InputSpec], preprocess: str) -> Samples:
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return _from_folder(path, specs, preprocess)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        return _from_npy(path, specs)
    if ext == ".npz":
        return _from_npz(path, specs)
    raise InputError(f"{path}: expected a .npy or .npz file, or a folder of them or of images")


NPY_MAGIC, NPZ_MAGIC = b"\x93NUMPY", b"PK"


def _load_array(path: str):
    with open(path, "rb") as f:
        head = f.read(6)
    if not (head.startswith(NPY_MAGIC) or head.startswith(NPZ_MAGIC)):
        kind = ".npz (a zip archive)" if path.lower().endswith(".npz") else ".npy"
        raise InputError(
            f"{path}: cannot be read as NumPy data (not a {kind} file: it does not start "
            "with NumPy's header)"
        )
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise InputError(
                f"{path}: holds pickled Python objects, which pwgroup does not load (loading "
                "them can run code); save plain numeric arrays"
            ) from None
        raise InputError(f"{path}: cannot be read as NumPy data ({_first_line(exc)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot be read as NumPy data ({_first_line(exc)})") from None


def _from_npy(path: str, specs: list[InputSpec]) -> Samples:
    if len(specs) != 1:
        raise InputError(
            f"{path}: a .npy holds one array, the model has {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}); give a .npz with one array per name"
        )
    array = _load_array(path)
    if not isinstance(array, np.ndarray):
        raise InputError(f"{path}: not a .npy array")
    return Samples({specs[0].name: array}, None, path)


def _from_npz(path: str, specs: list[InputSpec]) -> Samples:
    with _load_array(path) as archive:
        try:
            arrays = {k: archive[k] for k in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise InputError(f"{path}: cannot be read as NumPy data ({_first_line(exc)})") from None
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    names = [s.name for s in specs]
    if len(specs) == 1 and list(arrays) == ["arr_0"]:
        arrays = {names[0]: arrays["arr_0"]}  # np.savez(path, x): an array saved without a name
    return Samples(arrays, labels, path)


def _from_folder(path: str, specs: list[InputSpec], preprocess: str) -> Samples:
    files = sorted(os.listdir(path))
    arrays = [f for f in files if f.lower().endswith((".npy", ".npz"))]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    classes = [f for f in files if os.path.isdir(os.path.join(path, f))]
    if arrays:
        parts = [_from_path(os.path.join(path, f), specs, preprocess) for f in arrays]
        return _concatenate(parts, path)
    if images or classes:
        return _images(path, images, classes, specs, preprocess)
    raise InputError(f"{path}: no .npy, .npz or image files in this folder")


def _concatenate(parts: list[Samples], source: str) -> Samples:
    keys = set(parts[0].inputs)
    if any(set(p.inputs) != keys for p in parts):
        raise InputError(f"{source}: the files hold different input names")
    with_labels = [p.labels is not None for p in parts]
    if any(with_labels) and not all(with_labels):
        raise InputError(f"{source}: some files have labels ('y') and some do not")
    try:
        inputs = {k: np.concatenate([p.inputs[k] for p in parts]) for k in keys}
        labels = np.concatenate([p.labels for p in parts]) if all(with_labels) else None
    except ValueError as exc:
        raise InputError(f"{source}: the files do not stack ({_first_line(exc)})") from None
    return Samples(inputs, labels, source)


def _images(path, images, classes, specs, preprocess) -> Samples:
    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise InputError(
            f"{path}: a folder of images needs a model with one image input, this one has "
            f"{', '.join(f'{s.name} {_shape_text(s.shape)}' for s in specs)}"
        )
    spec = specs[0]
    files, labels = [os.path.join(path, f) for f in images], None
    if classes and not images:
        files, labels = [], []
        for index, name in enumerate(classes):
            folder = os.path.join(path, name)
            found = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            files += [os.path.join(folder, f) for f in found]
            labels += [index] * len(found)
        labels = np.asarray(labels, np.int64)
    if not files:
        raise InputError(f"{path}: no image files in this folder")
    array = np.stack([_read_image(f, spec) for f in files]).astype(np.float32)
    array = _preprocess(array, preprocess)
    if not spec.channels_last:
        array = np.moveaxis(array, -1, 1)
    return Samples({spec.name: array}, labels, path)


def _read_image(file: str, spec: InputSpec) -> np.ndarray:
    """One image as H x W x C floats 0..255, at the model's size (open sizes: the file's)."""
    from PIL import Image, UnidentifiedImageError

    h, w, c = spec.shape[1:] if spec.channels_last else (*spec.shape[2:], spec.shape[1])
    try:
        with Image.open(file) as image:
            image = image.convert("L" if c == 1 else "RGB")
            if h is not None or w is not None:
                size = (w or image.width, h or image.height)
                image = image.resize(size, Image.BILINEAR)
            array = np.asarray(image, np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{file}: not a readable image ({_first_line(exc)})") from None
    return array[..., None] if array.ndim == 2 else array


def _preprocess(pixels: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return pixels
    if how == "0..1":
        return pixels / 255.0
    if how == "-1..1":
        return pixels / 127.5 - 1.0
    if pixels.shape[-1] != 3:
        raise InputError("--preprocess imagenet needs RGB images (3 channels)")
    return (pixels / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD


# ---- from memory ----------------------------------------------------------------------------


def _from_memory(data, specs: list[InputSpec]) -> Samples:
    if isinstance(data, np.ndarray):
        return _one_array(data, specs)
    if isinstance(data, dict):
        data = dict(data)
        labels = next((data.pop(k) for k in LABEL_KEYS if k in data), None)
        return Samples({k: np.asarray(v) for k, v in data.items()}, labels, "calibration data")
    if hasattr(data, "as_numpy_iterator"):
        return _from_feeds(data.as_numpy_iterator(), specs, "the tf.data.Dataset")
    if isinstance(data, Iterable):
        return _from_feeds(iter(data), specs, "the calibration feeds")
    raise InputError(
        f"calibration data of type {type(data).__name__}: give an array, a dict of arrays, an "
        "iterable of feeds, a tf.data.Dataset or a path"
    )


def _one_array(array: np.ndarray, specs: list[InputSpec]) -> Samples:
    if len(specs) != 1:
        raise InputError(
            f"one array given, the model has {len(specs)} inputs; give a dict of arrays"
        )
    return Samples({specs[0].name: array}, None, "calibration data")


def _from_feeds(feeds: Iterator, specs: list[InputSpec], source: str) -> Samples:
    """Feeds are batches: a dict, an array (one input) or an (inputs, labels) pair."""
    parts = []
    for feed in feeds:
        labels = None
        if isinstance(feed, tuple) and len(feed) == 2:
            feed, labels = feed
        if isinstance(feed, dict):
            part = Samples({k: np.asarray(v) for k, v in feed.items()}, None, source)
        else:
            part = _one_array(np.asarray(feed), specs)
        part.labels = None if labels is None else np.asarray(labels)
        part.source = source
        parts.append(part)
    if not parts:
        raise InputError(f"{source} is empty")
    return _concatenate(parts, source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
