"""graphopt.data: every form of calibration data a user may give, read and checked."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.data import InputSpec, Samples, load_samples
from graphopt.errors import InputError

IMAGE = [InputSpec("image", (None, 8, 8, 3))]
TWO = [InputSpec("a", (None, 4)), InputSpec("b", (None, 2, 2), "int64")]


def test_npy_npz_folder_and_memory_forms_give_the_same_samples(tmp_path):
    x = np.random.default_rng(0).random((6, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", image=x, y=np.arange(6))
    folder = tmp_path / "parts"
    folder.mkdir()
    np.save(folder / "0.npy", x[:4])
    np.save(folder / "1.npy", x[4:])
    forms = [
        str(tmp_path / "x.npy"),
        str(tmp_path / "x.npz"),
        str(folder),
        x,
        {"image": x},
        [x[:3], x[3:]],
        ({"image": x[i : i + 2]} for i in range(0, 6, 2)),
    ]
    for form in forms:
        samples = load_samples(form, IMAGE)
        np.testing.assert_array_equal(samples.inputs["image"], x)
    assert list(load_samples(str(tmp_path / "x.npz"), IMAGE).labels) == list(range(6))


def test_tf_data_dataset_with_labels():
    import tensorflow as tf

    x = np.ones((5, 8, 8, 3), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(5))).batch(2)
    samples = load_samples(ds, IMAGE)
    assert len(samples) == 5 and list(samples.labels) == [0, 1, 2, 3, 4]


def test_image_folder_resized_scaled_and_labelled_by_class_folder(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 255), ("dog", 0)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 10), (value, value, value)).save(tmp_path / cls / "a.png")
    samples = load_samples(str(tmp_path), IMAGE, preprocess="-1..1")
    assert samples.inputs["image"].shape == (2, 8, 8, 3)
    assert np.allclose(samples.inputs["image"][0], 1.0)
    assert np.allclose(samples.inputs["image"][1], -1.0)
    assert list(samples.labels) == [0, 1]
    nchw = [InputSpec("x", (None, 3, 5, 7))]
    assert load_samples(str(tmp_path), nchw).inputs["x"].shape == (2, 3, 5, 7)


SCALAR = [InputSpec("x", (None, 3)), InputSpec("sr", (), "int64")]


@pytest.mark.parametrize(
    "data, specs, message",
    [
        (np.zeros((2, 8, 8, 1)), IMAGE, "the model wants (N, 8, 8, 3)"),
        (np.zeros((0, 8, 8, 3)), IMAGE, "is empty"),
        (np.full((2, 8, 8, 3), np.nan), IMAGE, "NaN"),
        (np.array([["a"] * 3] * 2), [InputSpec("t", (None, 3))], "dtype"),
        ({"a": np.zeros((2, 4))}, TWO, "missing ['b']"),
        ({"a": np.zeros((2, 4)), "b": np.zeros((2, 2, 2))}, TWO, "dtype float64"),
        ({"a": np.zeros((2, 4)), "b": np.zeros((3, 2, 2), np.int64)}, TWO, "different numbers"),
        (np.zeros((2, 4)), TWO, "one array given, the model has 2 inputs"),
        ([], IMAGE, "is empty"),
        ({"t": np.float32(3)}, [InputSpec("t", (None, 3))], "'t' is a single value"),
        # silero-vad's sample rate: a scalar input has no axis of samples
        ({"x": np.zeros((2, 3)), "sr": np.array(16000)}, SCALAR, "'sr' is a scalar in the model"),
    ],
)
def test_bad_data_is_refused_with_a_sentence(data, specs, message):
    with pytest.raises(InputError, match=None) as info:
        load_samples(data, specs)
    assert message in str(info.value)


def test_bad_files_are_named(tmp_path):
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not numpy")
    (tmp_path / "empty").mkdir()
    for path, message in (
        (broken, "broken.npy: cannot be read"),
        (tmp_path / "missing.npz", "missing.npz: no such file"),
        (tmp_path / "empty", "no .npy, .npz or image files"),
    ):
        with pytest.raises(InputError) as info:
            load_samples(str(path), IMAGE)
        assert message in str(info.value)
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    with pytest.raises(InputError, match="a .npy holds one array, the model has 2 inputs"):
        load_samples(str(tmp_path / "x.npy"), TWO)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "pic.png").write_bytes(b"png? no")
    with pytest.raises(InputError, match="pic.png: not a readable image"):
        load_samples(str(pictures), IMAGE)
    with pytest.raises(InputError, match="a folder of images needs a model with one image input"):
        load_samples(str(pictures), TWO)


def test_split_is_seeded_and_disjoint():
    samples = Samples({"a": np.arange(20)[:, None].astype(np.float32)})
    fit, held = samples.split(0.25, seed=3)
    again, _ = samples.split(0.25, seed=3)
    assert len(held) == 5 and len(fit) == 15
    assert not set(fit.inputs["a"].ravel()) & set(held.inputs["a"].ravel())
    np.testing.assert_array_equal(fit.inputs["a"], again.inputs["a"])


def test_safe_casts_come_with_a_notice_the_rest_are_refused():
    """int64/float64 arrays for a float32 model were cast silently, whatever they held."""
    import warnings

    from graphopt.errors import Notice

    spec = [InputSpec("x", (None, 3))]
    for array in (
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.ones((2, 3)),
        np.ones((2, 3), np.uint8),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            samples = load_samples(array, spec)
        assert samples.inputs["x"].dtype == np.float32
        np.testing.assert_array_equal(samples.inputs["x"], array)
        (notice,) = [w for w in caught if issubclass(w.category, Notice)]
        assert f"{array.dtype} values cast to float32" in str(notice.message)
    for array, message in (
        (np.full((2, 3), 1e300), "beyond the range of float32"),
        (np.full((2, 3), 2**40, np.int64), "does not hold exactly"),
        (np.ones((2, 3), bool), "dtype bool"),
        (np.ones((2, 3), np.complex64), "dtype complex64"),
    ):
        with pytest.raises(InputError, match=message):
            load_samples(array, spec)
    ids = [InputSpec("ids", (None, 3), "int32")]
    with pytest.raises(InputError, match="a cast would lose values"):
        load_samples(np.full((2, 3), 1.5), ids)
    with pytest.raises(InputError, match="beyond the range of int32"):
        load_samples(np.full((2, 3), 2**40, np.int64), ids)


def test_files_that_are_not_numpy_arrays_say_what_they_are(tmp_path):
    """`garbage.npy` was reported as 'pickled (object) data'; a one-array .npz under another
    input's name was taken for the model's input."""
    (tmp_path / "garbage.npy").write_bytes(b"\x00\x01 definitely not numpy")
    (tmp_path / "garbage.npz").write_bytes(b"neither")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "named.npz", label_image=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "unnamed.npz", np.zeros((2, 8, 8, 3), np.float32))
    for name, message in (
        ("garbage.npy", "not a .npy file: it does not start with NumPy's header"),
        ("garbage.npz", "not a .npz (a zip archive) file"),
        ("objects.npy", "holds pickled Python objects, which pwgroup does not load"),
        ("named.npz", "inputs ['label_image'] do not match the model's ['image']"),
    ):
        with pytest.raises(InputError) as info:
            load_samples(str(tmp_path / name), IMAGE)
        assert str(info.value).startswith(str(tmp_path / name)) and message in str(info.value)
    assert load_samples(str(tmp_path / "unnamed.npz"), IMAGE).inputs["image"].shape == (2, 8, 8, 3)
