"""Read PyTorch checkpoint files (``torch.save`` zip archives) without torch and without running their code.

A ``.pth`` file is a zip holding ``data.pkl`` (a pickle) and one raw file per
tensor storage. A pickle can name any Python callable and have it called, so
``data.pkl`` is read by an unpickler that resolves only an allowlist of names,
each to an inert constructor written here: tensor and parameter rebuilds
(NumPy arrays over the raw storages), ``OrderedDict``, ``slice``,
``torch.device``, the NumPy array, dtype and scalar constructors, and the
latin-1 ``_codecs.encode`` that stores their bytes. Any other
name refuses the file, before anything it names is called.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

# torch's legacy typed-storage classes, as a pickle names them, and their element types
_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpoint(ValueError):
    """The file names a Python object outside the allowlist (possibly code); nothing of it was run."""


def _rebuild_tensor(storage, offset, size, stride, *_):
    """A tensor as a NumPy array: ``size`` elements of ``storage`` from ``offset``, with ``stride`` (in elements)."""
    if not size:
        return np.array(storage[offset], copy=True)
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=[s * item for s in stride])
    return np.array(view, copy=True)


def _rebuild_parameter(data, *_):
    return data


def _device(*args):
    return str(args[0]) if args else "cpu"


def _scalar(dtype, data=None):
    return np.frombuffer(data, dtype)[0] if data is not None else dtype.type()


def _latin1(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it: the bytes of NumPy arrays, written as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpoint(f"_codecs.encode is allowed only for latin-1 text, not {encoding!r}")
    return text.encode("latin1")


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1,
    ("torch", "device"): _device,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "scalar")] = _scalar
    _ALLOWED[(_module, "_reconstruct")] = _numpy_reconstruct()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._order = archive, prefix, byteorder
        self._storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafeCheckpoint(f"it names {module}.{name}, which a model file has no need of "
                               "(only tensors, containers and numbers are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"unknown persistent id {pid!r:.80}")
        _, dtype, key, _, numel = pid
        if not (isinstance(dtype, type) and dtype in _STORAGES.values()):
            raise UnsafeCheckpoint(f"unknown storage type {dtype!r:.80}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            array = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<" if self._order == "little" else ">"))
            if array.size != numel:
                raise ValueError(f"storage {key} holds {array.size} elements, the pickle says {numel}")
            self._storages[key] = array.astype(np.dtype(dtype).newbyteorder("="))
        return self._storages[key]


def load(path) -> object:
    """The object a ``torch.save`` zip file holds, tensors as NumPy arrays.

    Raises:
        UnsafeCheckpoint: the pickle names anything beyond tensors, containers and numbers.
        ValueError: not a torch zip file, or a damaged one.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path}: not a PyTorch zip checkpoint ({err})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a PyTorch zip checkpoint (no single data.pkl)")
        prefix = pickles[0][: -len("/data.pkl")]
        names = set(archive.namelist())
        order = archive.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in names else "little"
        try:
            return _Unpickler(archive.read(pickles[0]), archive, prefix, order).load()
        except UnsafeCheckpoint as err:
            raise UnsafeCheckpoint(f"{path}: refused: {err}") from None
        except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile, ValueError, TypeError) as err:
            raise ValueError(f"{path}: damaged PyTorch checkpoint ({type(err).__name__}: {err})") from None
