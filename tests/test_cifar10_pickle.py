"""CIFAR-10 batches are unpickled only through the allow-list in ssn_exp.lightning.cifar10 (fast, no network)."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import shlex
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10
from torchvision.transforms import ToTensor

from ssn_exp.lightning.cifar10 import CIFAR10Batches, UnsafePickleError, load_batch

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_SIZES = (3, 2, 4, 1, 2)  # images in data_batch_1..5
TEST_SIZE = 3


class _TorchvisionCIFAR10(CIFAR10):
    """torchvision's class with the md5 checks off (check_integrity(path, None) only asks that the file exists)."""

    train_list = [(name, None) for name, _ in CIFAR10.train_list]
    test_list = [(name, None) for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def _batches(seed: int = 0) -> dict[str, dict]:
    """{file name: content} for a tiny CIFAR-10 folder, as the real batches are laid out."""
    rng = np.random.default_rng(seed)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, [*TRAIN_SIZES, TEST_SIZE]):
        out[name] = {
            "batch_label": f"{name} of the tiny test set",
            "labels": [int(y) for y in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
    out["batches.meta"] = {"num_cases_per_batch": 4, "label_names": LABEL_NAMES, "num_vis": 3072}
    return out


def _write_folder(root: Path, dump, seed: int = 0) -> Path:
    """Write the tiny folder under root/cifar-10-batches-py with dump(obj) -> bytes; returns the folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in _batches(seed).items():
        (folder / name).write_bytes(dump(content))
    return folder


class _Inert:
    """Stands for every global while listing them: callable, takes any state, runs nothing."""

    def __init__(self, *args):
        pass

    def __call__(self, *args):
        return _Inert()

    def __setstate__(self, state):
        pass


def _globals(blob: bytes) -> set[str]:
    """The 'module name' globals a pickle asks for, whatever opcode names them; nothing is imported or run."""
    seen: set[str] = set()

    class Observer(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module} {name}")
            return _Inert()

    Observer(io.BytesIO(blob), encoding="latin1").load()
    return seen


def _assert_same_as_torchvision(root: Path, train: bool) -> None:
    ours = CIFAR10Batches(root, train=train, transform=ToTensor())
    theirs = _TorchvisionCIFAR10(str(root), train=train, transform=ToTensor())
    assert ours.data.dtype == np.uint8 and ours.data.shape == theirs.data.shape
    assert np.array_equal(ours.data, theirs.data)
    assert ours.targets == theirs.targets and all(type(y) is int for y in ours.targets)
    assert ours.classes == theirs.classes == LABEL_NAMES
    assert len(ours) == len(theirs) == (sum(TRAIN_SIZES) if train else TEST_SIZE)
    for i in range(len(ours)):
        (x, y), (xt, yt) = ours[i], theirs[i]
        assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32)
        assert torch.equal(x, xt) and y == yt


# ------------------------------------------------------------------------------------------------ benign folders


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_plain_pickle_folder_matches_torchvision(tmp_path, protocol, train):
    _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=protocol))
    _assert_same_as_torchvision(tmp_path, train)


def test_items_without_transform_are_pil_images_like_torchvision(tmp_path):
    _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=4))
    ours, theirs = CIFAR10Batches(tmp_path, train=False), _TorchvisionCIFAR10(str(tmp_path), train=False)
    img, y = ours[1]
    assert img.mode == "RGB" and img.size == (32, 32) and y == theirs[1][1]
    assert np.array_equal(np.asarray(img), np.asarray(theirs[1][0]))


def _py2_cpickle(obj, protocol: int) -> bytes:
    """obj as Python 2's cPickle wrote it (the real CIFAR-10 batches): str as BINSTRING, arrays through
    numpy.core.multiarray._reconstruct with the pixels as one raw string. Handles dict, list, str, int, uint8 arrays."""

    def tup(items: list[bytes]) -> bytes:
        if protocol >= 2 and len(items) <= 3:
            return b"".join(items) + [b")", b"\x85", b"\x86", b"\x87"][len(items)]
        return b"(" + b"".join(items) + b"t"

    def string(s: str) -> bytes:
        b = s.encode("latin-1")
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    def false() -> bytes:
        return b"\x89" if protocol >= 2 else b"I00\n"

    def save(x) -> bytes:
        if isinstance(x, dict):
            return b"}" + (b"(" + b"".join(save(k) + save(v) for k, v in x.items()) + b"u" if x else b"")
        if isinstance(x, list):
            return b"]" + (b"(" + b"".join(save(v) for v in x) + b"e" if x else b"")
        if isinstance(x, str):
            return string(x)
        if isinstance(x, int):
            return integer(x)
        assert isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.flags.c_contiguous
        dtype = b"cnumpy\ndtype\n" + tup([string("u1"), integer(0), integer(1)]) + b"R"
        dtype += tup([integer(3), string("|"), b"N", b"N", b"N", integer(-1), integer(-1), integer(0)]) + b"b"
        shape = tup([integer(n) for n in x.shape])
        raw = string(x.tobytes().decode("latin-1"))
        head = b"cnumpy.core.multiarray\n_reconstruct\n" + tup([b"cnumpy\nndarray\n", tup([integer(0)]), string("b")])
        return head + b"R" + tup([integer(1), shape, dtype, false(), raw]) + b"b"

    return (b"\x80\x02" if protocol >= 2 else b"") + save(obj) + b"."


@pytest.mark.parametrize("protocol", [1, 2])
def test_python2_cpickle_layout_matches_torchvision(tmp_path, protocol):
    folder = _write_folder(tmp_path, lambda obj: _py2_cpickle(obj, protocol))
    blob = (folder / "data_batch_1").read_bytes()
    assert _globals(blob) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert b"T\x00\x24\x00\x00" in blob  # the 3 x 3072 pixels as one BINSTRING, as in the real files
    batch = load_batch(folder / "data_batch_1")
    want = _batches()["data_batch_1"]
    assert set(batch) == set(want) and all(isinstance(k, str) for k in batch)
    assert np.array_equal(batch["data"], want["data"]) and batch["data"].dtype == np.uint8
    assert batch["labels"] == want["labels"] and batch["filenames"] == want["filenames"]
    assert batch["batch_label"] == want["batch_label"]
    for train in (True, False):
        _assert_same_as_torchvision(tmp_path, train)


def test_python2_style_bytes_keys_are_normalised(tmp_path):
    """Protocol 2 with bytes keys and values: Python 3 writes each bytes as _codecs.encode(text, 'latin1')."""
    content = {k.encode(): v for k, v in _batches()["test_batch"].items()}
    content[b"batch_label"] = b"testing batch 1 of 1"
    content[b"filenames"] = [f.encode() for f in content[b"filenames"]]
    content[b"empty"] = b""
    blob = pickle.dumps(content, protocol=2)
    assert "_codecs encode" in _globals(blob) and "__builtin__ bytes" in _globals(blob)
    path = tmp_path / "test_batch"
    path.write_bytes(blob)
    batch = load_batch(path)
    assert sorted(batch) == ["batch_label", "data", "empty", "filenames", "labels"]
    assert batch["batch_label"] == b"testing batch 1 of 1" and batch["empty"] == b""
    assert batch["filenames"] == content[b"filenames"]
    assert np.array_equal(batch["data"], content[b"data"]) and batch["labels"] == content[b"labels"]

    folder = tmp_path / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(blob)
    names = {b"label_names": [n.encode() for n in LABEL_NAMES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(names, protocol=2))
    ds = CIFAR10Batches(tmp_path / "c10", train=False)
    assert ds.targets == content[b"labels"] and ds.classes == LABEL_NAMES
    assert np.array_equal(ds.data, content[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("protocol", range(0, 6))
def test_load_batch_equals_pickle_for_benign_content(tmp_path, protocol):
    content = {
        "u8": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "big_endian": np.arange(3, dtype=">f4"),
        "bools": np.array([True, False]),
        "empty": np.zeros((0, 3072), np.uint8),
        "strided": np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2],
        "labels": [0, 9, 300, -5, 2**40],
        "nested": {"t": (1, "a", None, 1.5, True), "b": b"xyz", "e": b""},
    }
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    got, want = load_batch(path), pickle.loads(path.read_bytes())
    assert set(got) == set(want)
    for k, w in want.items():
        if isinstance(w, np.ndarray):
            g = got[k]
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape, k
            assert np.array_equal(g, w) and g.flags.writeable, k
        else:
            assert got[k] == w, k


# ------------------------------------------------------------------------------------------------ malicious files


class _Reduce:
    """Pickles as a call of fn(*args), then BUILD with state if given: what an attacker writes."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _payloads(marker: Path) -> dict[str, _Reduce]:
    return {
        "os.system": _Reduce(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": _Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Reduce(subprocess.Popen, ["touch", str(marker)]),
    }


def _run_plainly(blob: bytes) -> None:
    """What an unrestricted pickle.load does with the payload (to show the payload is live)."""
    out = pickle.loads(blob)
    for v in out.values():
        if isinstance(v, subprocess.Popen):
            v.wait()


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_payload_is_live_under_plain_pickle(tmp_path, kind):
    marker = tmp_path / "MARKER"
    _run_plainly(pickle.dumps({"data": _payloads(marker)[kind]}, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_malicious_batch_is_refused_and_nothing_runs(tmp_path, kind, protocol):
    marker = tmp_path / "MARKER"
    folder = _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=protocol))
    poisoned = dict(_batches()["test_batch"], labels=[1, _payloads(marker)[kind], 2])
    target = folder / "test_batch"
    target.write_bytes(pickle.dumps(poisoned, protocol=protocol))

    with pytest.raises(UnsafePickleError) as info:
        CIFAR10Batches(tmp_path, train=False, transform=ToTensor())
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg and str(target) in msg and info.value.path == str(target)
    names = {"os.system": ("posix.system", "os.system"), "builtins.eval": ("builtins.eval", "__builtin__.eval")}
    assert any(n in msg for n in names.get(kind, (kind,))), msg
    assert info.value.global_name in msg
    assert "cifar.html" in msg and isinstance(info.value, ValueError)

    with pytest.raises(UnsafePickleError):
        load_batch(target)
    assert not marker.exists()
    CIFAR10Batches(tmp_path, train=True)  # the clean train batches still load


def test_malicious_meta_file_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    folder = _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=4))
    meta = {"label_names": _payloads(marker)["os.system"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(UnsafePickleError, match="batches.meta"):
        CIFAR10Batches(tmp_path, train=False)
    assert not marker.exists()


class _ForgedDType:
    """A structured dtype with an object field whose pickled flags claim it holds no objects."""

    def __reduce__(self):
        return np.dtype, ("V8", False, True), (3, "|", None, ("f",), {"f": (np.dtype("O"), 0)}, 8, 1, 0)


@pytest.mark.parametrize("protocol", [2, 5])
def test_forged_numpy_dtype_is_refused(tmp_path, protocol):
    """Only allowed names, yet with numpy's own dtype/_frombuffer the pickle bytes become object pointers (a crash
    on first access): the stand-ins refuse any dtype but plain bool/int/uint/float."""
    if protocol == 5:
        forged = _Reduce(np._core.numeric._frombuffer, b"A" * 8, _ForgedDType(), (1,), "C")
    else:
        state = (1, (1,), _ForgedDType(), False, b"A" * 8)
        forged = _Reduce(np._core.multiarray._reconstruct, np.ndarray, (0,), b"b", state=state)
    blob = pickle.dumps({"data": forged}, protocol=protocol)
    assert _globals(blob) <= {
        "numpy dtype",
        "numpy ndarray",
        "numpy._core.numeric _frombuffer",
        "numpy._core.multiarray _reconstruct",
        "_codecs encode",
    }
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="not a plain bool/int/uint/float") as info:
        load_batch(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "value",
    [
        # BUILD on an allowed global (give it attributes, then POP it and go on): would poison later loads
        b"cnumpy\ndtype\n}X\x03\x00\x00\x00fooK\x01sb0K\x01",
        b"cnumpy\ndtype\nN}X\x08\x00\x00\x00__call__K\x01s\x86b0K\x01",  # ... or slot state
        b"cnumpy\nndarray\nK\x05\x85\x85R",  # call numpy.ndarray itself: ndarray((5,))
        b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R",  # another codec
        b"c__builtin__\nbytes\nK\x05\x85R",  # bytes(5): only bytes() is allowed
        b"cnumpy\ndtype\nX\x01\x00\x00\x00O\x89\x88\x87R",  # an object dtype
    ],
    ids=["build-dict", "build-slots", "ndarray-call", "codec", "bytes-n", "object-dtype"],
)
def test_allowed_names_cannot_be_misused(tmp_path, value):
    blob = b"\x80\x02}X\x01\x00\x00\x00k" + value + b"s."  # {"k": value}
    path = tmp_path / "batch"
    path.write_bytes(blob)
    with pytest.raises(ValueError) as info:
        load_batch(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # and the stand-ins kept no state: a clean batch still loads
    _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=2))
    _assert_same_as_torchvision(tmp_path, train=False)


# ------------------------------------------------------------------------------------------------ broken files


@pytest.mark.parametrize(
    "make",
    [
        lambda good: b"",
        lambda good: good[: len(good) // 2],
        lambda good: good[:-1],
        lambda good: b"this is not a pickle\n",
        lambda good: bytes(range(256)) * 4,
        lambda good: b"\x80\x05\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
        lambda good: pickle.dumps([1, 2, 3]),
        lambda good: pickle.dumps({1: "int key"}),
    ],
    ids=["empty", "half", "no-stop", "text", "garbage", "huge-frame", "a-list", "int-key"],
)
def test_truncated_or_garbage_file_is_one_line_value_error(tmp_path, make):
    folder = _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=4))
    path = folder / "data_batch_3"
    path.write_bytes(make(path.read_bytes()))
    for load in (lambda: load_batch(path), lambda: CIFAR10Batches(tmp_path, train=True)):
        with pytest.raises(ValueError) as info:
            load()
        msg = str(info.value)
        assert not isinstance(info.value, UnsafePickleError)
        assert "\n" not in msg and str(path) in msg, msg


def test_missing_files(tmp_path):
    folder = _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=4))
    (folder / "batches.meta").unlink()
    ds = CIFAR10Batches(tmp_path, train=False)
    assert ds.classes is None and len(ds) == TEST_SIZE

    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10Batches(tmp_path, train=True)
    assert str(folder / "data_batch_4") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        CIFAR10Batches(tmp_path / "elsewhere", train=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_batch(tmp_path / "nowhere")


def _u8(n: int, cols: int = 3072) -> np.ndarray:
    return np.zeros((n, cols), dtype=np.uint8)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"data": _u8(3, 3071)}, "uint8 array of shape"),
        ({"data": np.zeros((3, 3072), np.float32)}, "uint8 array of shape"),
        ({"data": np.zeros((3, 3, 32, 32), np.uint8)}, "uint8 array of shape"),
        ({"data": [[0] * 3072] * 3}, "uint8 array of shape"),
        ({"labels": [0, 10, 1]}, "labels must be in 0..9"),
        ({"labels": [0, -1, 1]}, "labels must be in 0..9"),
        ({"labels": [0, 1]}, "2 labels for 3 images"),
        ({"labels": [0, "1", 2]}, "list of ints"),
        ({"labels": [0.0, 1.0, 2.0]}, "list of ints"),
        ({"labels": None}, "list of ints"),
        ({"labels": "missing"}, "no 'labels' entry"),
        ({"data": "missing"}, "no 'data' entry"),
    ],
    ids=[
        "3071-cols",
        "float-data",
        "4d-data",
        "list-data",
        "label-10",
        "label-neg",
        "too-few",
        "str-label",
        "float-label",
        "no-list",
        "no-labels",
        "no-data",
    ],
)
def test_wrong_shapes_or_labels_are_value_errors(tmp_path, change, match):
    folder = _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=4))
    batch = dict(_batches()["test_batch"], data=_u8(3), labels=[0, 1, 9])
    batch.update(change)
    for key, value in change.items():
        if isinstance(value, str) and value == "missing":
            del batch[key]
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(ValueError, match=match) as info:
        CIFAR10Batches(tmp_path, train=False)
    assert str(folder / "test_batch") in str(info.value) and "\n" not in str(info.value)


def test_labels_as_an_int_array_are_accepted(tmp_path):
    folder = _write_folder(tmp_path, lambda obj: pickle.dumps(obj, protocol=5))
    batch = dict(_batches()["test_batch"], labels=np.array([3, 1, 4], dtype=np.int64))
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=5))
    ds = CIFAR10Batches(tmp_path, train=False)
    assert ds.targets == [3, 1, 4] and all(type(y) is int for y in ds.targets)
