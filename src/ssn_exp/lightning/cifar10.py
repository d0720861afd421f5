"""CIFAR-10 from the python pickle batches, without trusting the pickles.

The threat
----------
CIFAR-10's python version (``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``) is a set of
pickles. ``pickle.load`` is a small virtual machine: a pickle may name any importable global (``os.system``,
``builtins.eval``, ``subprocess.Popen``) and call it with arguments of its choosing, so whoever can place a file in a
data folder runs code as the training job the moment it is read. torchvision's ``CIFAR10`` guards against this only
through its md5 sums, and the project switched those off to accept re-packed copies; a poisoned ``test_batch`` then
ran on load.

The defence
-----------
Nothing from a data folder is unpickled unverified. :func:`load_batch` reads one batch with a restricted
:class:`pickle.Unpickler` whose ``find_class`` (the only door through which a pickle reaches code) knows a fixed
table of names and refuses every other with :class:`UnsafePickleError`, before anything is imported or called; it
never falls back to the default ``find_class``. The table holds what the batches themselves use, checked on the
layout of the real files (Python 2 cPickle, binary protocol, read with ``encoding="latin1"``; the tests re-create it
opcode by opcode) and on batches written by Python 3 ``pickle.dump`` at protocols 0 to 5:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (NumPy 1 / 2), ``numpy.ndarray``
  and ``numpy.dtype``: how an array pickles at protocols 0 to 4;
- ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``: how a contiguous array pickles at
  protocol 5;
- ``_codecs.encode``, only as ``encode(text, "latin1")``: how Python 3 writes a non-empty ``bytes`` at protocol 2
  (the raw pixels of every array included), and ``builtins.bytes`` (``__builtin__.bytes``), only with no argument:
  how it writes ``b""`` at protocol 2.

``numpy.core.multiarray.scalar`` is *not* allowed: CIFAR-10 labels are a list of python ints, which pickles build with
opcodes alone. Lists, dicts, tuples, str, bytes, ints, floats, bools and None need no global at all.

The names are not bound to NumPy's own functions either. NumPy's ``dtype.__setstate__`` takes the dtype's flags from
the pickle, so a pickle using only these names can make a structured dtype with an object field that claims to
hold no objects, and ``frombuffer`` then reads pickle bytes as object pointers (a crash, or worse). Each allowed name
is therefore bound to a small stand-in that accepts only plain numeric dtypes (bool, int, uint, float; no fields,
subarrays or objects), checks shape against the byte count, and builds the array with ``np.frombuffer`` from a dtype
made afresh; the stand-ins cannot be given state or attributes by the pickle, and the arrays are only materialised
after the pickle has been read.

Truncated or garbage files fail with a one-line ``ValueError`` naming the file, missing ones with
``FileNotFoundError``. :class:`CIFAR10Batches` is a drop-in for torchvision's ``CIFAR10`` (same ``data``,
``targets``, ``classes`` and items) built on :func:`load_batch`, that also checks each batch's shapes and labels.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

__all__ = ["UnsafePickleError", "load_batch", "CIFAR10Batches", "BASE_FOLDER", "TRAIN_FILES", "TEST_FILES", "META_FILE"]

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

_ROW = 3 * 32 * 32  # one image: 1024 red, 1024 green, 1024 blue values, row-major
_NUM_CLASSES = 10


def _one_line(text: object, limit: int = 200) -> str:
    """``text`` with control characters replaced and cut to ``limit`` characters (pickles choose these strings)."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


class UnsafePickleError(ValueError):
    """A batch file asks the unpickler for a global outside the CIFAR-10 allow-list; nothing was run."""

    def __init__(self, path: str | os.PathLike, global_name: str):
        self.path = str(path)
        self.global_name = global_name
        super().__init__(
            f"refusing to load {_one_line(self.path, 1000)}: it asks to run {_one_line(global_name)}, but a CIFAR-10 "
            f"batch holds only numpy arrays, lists, dicts, bytes and str (is the file from {CIFAR_URL}?)"
        )


class _BadContent(ValueError):
    """Raised inside the unpickler by the stand-ins; load_batch reports it with the file name."""


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals. Only these objects are ever handed to the unpickler.


class _Allowed:
    """A callable given to the unpickler in place of a global. Immutable, and refuses BUILD (``__setstate__``)."""

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, key: str, value: Any) -> None:
        raise _BadContent(f"the pickle tries to set an attribute on {self._name}")

    def __setstate__(self, state: Any) -> None:
        raise _BadContent(f"the pickle tries to give state to {self._name}")

    def __repr__(self) -> str:
        return f"<allowed {self._name}>"


class _NDArrayMarker:
    """Stands for ``numpy.ndarray``: only usable as ``_reconstruct``'s first argument, never called."""

    __slots__ = ()

    def __setattr__(self, key: str, value: Any) -> None:
        raise _BadContent("the pickle tries to set an attribute on numpy.ndarray")

    def __setstate__(self, state: Any) -> None:
        raise _BadContent("the pickle tries to give state to numpy.ndarray")


_NDARRAY = _NDArrayMarker()


class _DTypeProxy:
    """What ``numpy.dtype(spec, align, copy)`` gives during loading: a plain numeric dtype, made afresh from ``spec``.

    ``__setstate__`` (the pickle's BUILD) may only choose the byte order; fields, subarrays and metadata are refused
    and the pickled flags, sizes and alignment are ignored, so no pickle can forge a dtype.
    """

    __slots__ = ("dtype",)

    def __init__(self, spec: Any, align: Any = False, copy: Any = False):
        if isinstance(spec, bytes):
            spec = spec.decode("latin-1")
        if not isinstance(spec, str) or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
            raise _BadContent(f"numpy.dtype called with unexpected arguments ({type(spec).__name__} spec)")
        try:
            dt = np.dtype(spec)
        except TypeError as e:
            raise _BadContent(f"invalid numpy dtype {_one_line(spec, 40)!r}") from e
        _check_plain(dt)
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise _BadContent("numpy dtype with an unexpected pickled state")
        endian, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None or (len(state) == 9 and state[8]):
            raise _BadContent("numpy dtype with fields, subarray or metadata (a CIFAR-10 batch has none)")
        if isinstance(endian, bytes):
            endian = endian.decode("latin-1")
        if endian not in ("<", ">", "|", "="):
            raise _BadContent(f"numpy dtype with byte order {_one_line(endian, 10)!r}")
        dt = self.dtype
        if endian in "<>" and dt.itemsize > 1:
            dt = dt.newbyteorder(endian)
        self.dtype = dt


def _check_plain(dt: np.dtype) -> None:
    if dt.kind not in "biuf" or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise _BadContent(f"numpy dtype {_one_line(dt, 40)} is not a plain bool/int/uint/float type")


def _as_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 32 or not all(type(n) is int and n >= 0 for n in shape):
        raise _BadContent(f"bad numpy array shape {_one_line(shape, 60)}")
    return shape


def _as_buffer(raw: Any) -> bytes | bytearray:
    if isinstance(raw, str):  # Python 2 str read with encoding="latin1", as numpy's own __setstate__ accepts
        return raw.encode("latin-1")
    if isinstance(raw, (bytes, bytearray)):
        return raw
    raise _BadContent(f"numpy array data is a {type(raw).__name__}, not bytes (object arrays are not allowed)")


def _build(raw: Any, dtype: Any, shape: Any, order: str, native: bool) -> np.ndarray:
    if not isinstance(dtype, _DTypeProxy):
        raise _BadContent(f"numpy array with a {type(dtype).__name__} in place of its dtype")
    buf, dt, shape = _as_buffer(raw), dtype.dtype, _as_shape(shape)
    if len(buf) != math.prod(shape) * dt.itemsize:
        raise _BadContent(f"numpy array of shape {shape} and dtype {dt} does not match its {len(buf)} data bytes")
    array = np.frombuffer(buf, dtype=dt).reshape(shape, order=order)
    if native and not dt.isnative:  # as numpy's ndarray.__setstate__ does: swap to native byte order
        return array.astype(dt.newbyteorder("="))
    return array.copy()


class _ArrayProxy:
    """What ``_reconstruct`` / ``_frombuffer`` give during loading; replaced by its array once the pickle is read."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None):
        self.array = array

    def __setstate__(self, state: Any) -> None:
        # numpy's ndarray.__reduce__ state: (version, shape, dtype, is_fortran, rawdata), or the same without version
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _BadContent("numpy array with an unexpected pickled state")
        shape, dtype, fortran, raw = state
        if not isinstance(fortran, (bool, int)):
            raise _BadContent("numpy array with an unexpected pickled state")
        self.array = _build(raw, dtype, shape, "F" if fortran else "C", native=True)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayProxy:
    if subtype is not _NDARRAY or not isinstance(typecode, (str, bytes)):
        raise _BadContent("numpy _reconstruct of something other than a plain numpy.ndarray")
    _as_shape(shape)
    return _ArrayProxy()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _ArrayProxy:
    if order not in ("C", "F"):
        raise _BadContent(f"numpy _frombuffer with order {_one_line(order, 10)!r}")
    return _ArrayProxy(_build(buf, dtype, shape, order, native=False))


def _latin1_encode(text: Any, encoding: Any) -> bytes:
    # Python 3 pickles a non-empty bytes object at protocol 2 as ``_codecs.encode(text, "latin1")``. Harmless here:
    # only that exact call is accepted (a str and the literal "latin1"), so no other codec is ever looked up, and it
    # turns a str into the bytes it spells, which is data, never code.
    if not isinstance(text, str) or encoding != "latin1":
        raise _BadContent("_codecs.encode used other than as encode(str, 'latin1')")
    return text.encode("latin-1")


def _empty_bytes() -> bytes:
    # Python 3 pickles b"" at protocol 2 as ``bytes()``; only the no-argument call is accepted.
    return b""


_RECONSTRUCT = _Allowed("numpy._core.multiarray._reconstruct", _reconstruct)
_FROMBUFFER = _Allowed("numpy._core.numeric._frombuffer", _frombuffer)
_DTYPE = _Allowed("numpy.dtype", _DTypeProxy)
_ENCODE = _Allowed("_codecs.encode", _latin1_encode)
_BYTES = _Allowed("builtins.bytes", _empty_bytes)

# (module, name) as written in the pickle -> stand-in. The C unpickler hands find_class the names unmapped, so
# Python 2 spellings (__builtin__) appear as such.
_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 1 and Python 2 (the real CIFAR-10 batches)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,  # protocol 5, NumPy 1
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,  # protocol 5, NumPy 2
    ("_codecs", "encode"): _ENCODE,  # bytes at protocol 2
    ("builtins", "bytes"): _BYTES,  # b"" at protocol 2
    ("__builtin__", "bytes"): _BYTES,  # ... written with fix_imports (the default)
}


def _display_name(module: str, name: str) -> str:
    """``module.name`` as the pickle spells it, plus the Python 3 name when it is a Python 2 one (commands.Popen)."""
    spelled = f"{module}.{name}"
    try:
        import _compat_pickle  # the stdlib's table of Python 2 -> 3 names; used here for the message only

        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    except (ImportError, AttributeError, TypeError):
        return spelled
    python3 = f"{module}.{name}"
    return spelled if python3 == spelled else f"{spelled} (Python 3: {python3})"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise UnsafePickleError(self._path, _display_name(module, name))
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise _BadContent("the pickle uses persistent ids")


def _materialise(obj: Any) -> Any:
    """``obj`` with each array stand-in replaced by its array (dicts, lists, tuples, sets followed)."""
    if isinstance(obj, _ArrayProxy):
        if obj.array is None:
            raise _BadContent("numpy array without data")
        return obj.array
    if isinstance(obj, dict):
        return {_materialise(k): _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_materialise(v) for v in obj)
    if isinstance(obj, (_DTypeProxy, _Allowed, _NDArrayMarker)):
        raise _BadContent(f"the pickle returns a bare {type(obj).__name__.strip('_')}")
    return obj


def load_batch(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle one CIFAR-10 batch (or ``batches.meta``) safely; keys normalised to ``str``.

    Raises :class:`UnsafePickleError` for a global outside the allow-list (nothing is imported or run),
    ``FileNotFoundError`` for a missing file, and a one-line ``ValueError`` naming the file for anything that is not
    a well-formed pickle of a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file not found: {path} (expected the python batches from {CIFAR_URL})")
    try:
        with open(path, "rb") as f:
            obj = _materialise(_RestrictedUnpickler(f, str(path)).load())
    except UnsafePickleError:
        raise
    except OSError:
        raise
    except Exception as e:  # truncated, garbage, or forged content: any failure to parse is the file's fault
        why = _one_line(e) if isinstance(e, _BadContent) else f"{type(e).__name__}: {_one_line(e)}"
        raise ValueError(f"cannot read {path}: not a valid CIFAR-10 pickle batch ({why})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"cannot read {path}: a CIFAR-10 batch is a dict, this pickle holds a {type(obj).__name__}")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            k = k.decode("latin-1")
        if not isinstance(k, str):
            raise ValueError(f"cannot read {path}: a CIFAR-10 batch has str keys, this one has {_one_line(k, 40)!r}")
        out[k] = v
    return out


def _get(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch, no {key!r} entry (has {_one_line(sorted(batch), 120)})")
    return batch[key]


def _check_batch(batch: dict[str, Any], path: Path) -> tuple[np.ndarray, list[int]]:
    data = _get(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, {_ROW}), got a {what}")
    labels = _get(batch, "labels", path)
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(type(y) is int for y in labels):
        raise ValueError(f"{path}: 'labels' must be a list of ints, got {_one_line(type(labels).__name__)}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    bad = [y for y in labels if not 0 <= y < _NUM_CLASSES]
    if bad:
        raise ValueError(f"{path}: labels must be in 0..{_NUM_CLASSES - 1}, found {bad[0]} ({len(bad)} out of range)")
    return data, list(labels)


def _check_meta(meta: dict[str, Any], path: Path) -> list[str]:
    names = _get(meta, "label_names", path)
    if isinstance(names, (list, tuple)):
        names = [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'label_names' must be a list of str")
    return names


class CIFAR10Batches(torch.utils.data.Dataset):
    """CIFAR-10 from ``root/cifar-10-batches-py/``, read with :func:`load_batch`; items as torchvision's ``CIFAR10``.

    ``data``: (N, 32, 32, 3) uint8 (HWC); ``targets``: list of int; ``classes``: the label names from
    ``batches.meta``, or ``None`` when that file is absent. Item ``i`` is ``(transform(PIL image), target)``.
    """

    def __init__(self, root: str | os.PathLike, train: bool, transform: Callable[[Any], Any] | None = None):
        self.root = Path(root)
        self.train = bool(train)
        self.transform = transform
        folder = self.root / BASE_FOLDER
        chunks: list[np.ndarray] = []
        self.targets: list[int] = []
        for name in TRAIN_FILES if self.train else TEST_FILES:
            path = folder / name
            data, labels = _check_batch(load_batch(path), path)
            chunks.append(data)
            self.targets.extend(labels)
        self.data = np.ascontiguousarray(np.vstack(chunks).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)))
        meta_path = folder / META_FILE
        self.classes: list[str] | None = None
        self.class_to_idx: dict[str, int] | None = None
        if meta_path.is_file():
            self.classes = _check_meta(load_batch(meta_path), meta_path)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return f"CIFAR10Batches(root={str(self.root)!r}, {split}, {len(self)} images)"
