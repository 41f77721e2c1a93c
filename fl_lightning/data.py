"""Where data lives and how it arrives: the data root, verified downloads, pickle-free loading.

Data root: `--data_dir`, else `$FL_LIGHTNING_DATA`, else `~/.cache/fl_lightning`. Each task converts
its dataset once into the layout of the offline copy (`.npz`, `.csv.gz`, `.jsonl`) and reuses it.
Downloads go to a temporary file, are checked against a sha256 when one is known, then renamed
into place, so an interrupted download never leaves a half file that looks finished.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DATA_ENV = "FL_LIGHTNING_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/fl_lightning")


class DataError(RuntimeError):
    """Data that is missing, cannot be fetched or fails verification."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data root: the argument, else `$FL_LIGHTNING_DATA`, else `~/.cache/fl_lightning` (created).

    A root that was asked for explicitly (argument or environment) must exist: a typo should fail
    loudly, not download gigabytes into a fresh folder.
    """
    if data_dir is not None:
        path, origin = Path(data_dir).expanduser(), "--data_dir"
    elif os.environ.get(DATA_ENV):
        path, origin = Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    else:
        path = DEFAULT_DATA_DIR.expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} (from {origin}) does not exist; point --data_dir or "
                        f"{DATA_ENV} at an existing folder, or unset both to use {DEFAULT_DATA_DIR}")
    return path


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Downloads `url` to `dest` (atomically), verifying its sha256 when given; reuses a verified `dest`.

    Raises:
        DataError: The download failed or its checksum does not match (the bad file is removed).
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {err}") from err
    if sha256 is not None and (actual := sha256_of(partial)) != sha256:
        partial.unlink(missing_ok=True)
        raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}")
    os.replace(partial, dest)
    return dest


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns any failure to parse `path` inside the block into a `DataError` naming the file and the fix.

    A corrupt, truncated or disguised file (e.g. a pickle saved under an `.npz` name) then ends in one
    line instead of the parser's traceback. `DataError`s raised inside pass through unchanged.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # whatever the parser raises (zipfile, gzip, pickle, csv, json, ...)
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}; the file is corrupt, truncated or not "
                        f"what its name says: delete it to download (or convert) it again") from err


def load_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Loads arrays from an `.npz` without pickle, checking that `keys` are present."""
    if not Path(path).is_file():
        raise DataError(f"missing data file {path}")
    with reading(path), np.load(path, allow_pickle=False) as archive:  # a lone .npy under this name fails here too
        missing = [k for k in keys or () if k not in archive.files]
        if missing:
            raise DataError(f"{path} lacks arrays {missing}; it has {archive.files}")
        return {name: archive[name] for name in (keys or archive.files)}


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """Writes arrays to an `.npz` atomically (write, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return path


# The globals a pickled plain `numpy.ndarray` needs (protocol 2-5, numpy 1.x and 2.x module names).
_NUMPY_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 buffers
    ("numpy", "ndarray"), ("numpy", "dtype"),
})


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild plain numpy arrays and refuses every other global.

    Code execution through pickle goes through `find_class` (REDUCE needs a callable, which must
    be looked up as a global), so refusing all globals but the array constructors refuses any
    payload that tries to run code: `os.system`, `builtins.eval`, `subprocess.Popen`, ...
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_PICKLE_GLOBALS:
            raise DataError(f"refusing to unpickle global {module}.{name}: only plain numpy arrays are allowed")
        if name == "_reconstruct":
            # numpy 2 moved `numpy.core` to `numpy._core`; resolve directly, without the deprecated alias.
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if name == "_frombuffer":
            try:
                from numpy._core.numeric import _frombuffer
            except ImportError:  # numpy 1.x
                from numpy.core.numeric import _frombuffer
            return _frombuffer
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid):
        raise DataError("refusing to unpickle a persistent id: only plain numpy arrays are allowed")


def load_numpy_pickle(source: Path | bytes) -> np.ndarray:
    """Reads a pickle that holds one plain `numpy.ndarray` (the paper's Southwest `.pkl` files), safely.

    Args:
        source: A file path or the pickle's bytes.

    Raises:
        DataError: The pickle names any global other than numpy's array constructors, or does not
            hold an ndarray of a plain (non-object) dtype.
    """
    is_path = isinstance(source, (str, os.PathLike))
    data = Path(source).read_bytes() if is_path else bytes(source)
    try:
        value = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except DataError:
        raise
    except Exception as err:  # a malformed pickle: report it as bad data, whatever the parser raised
        where = f"{source}: " if is_path else ""
        raise DataError(f"{where}not a readable numpy pickle ({type(err).__name__}: {err}); the file is corrupt or "
                        f"truncated: delete it to download it again") from err
    if not isinstance(value, np.ndarray):
        raise DataError(f"expected a plain numpy array in the pickle, got {type(value).__name__}")
    if value.dtype.hasobject:
        raise DataError("expected a plain numpy array in the pickle, got an object array")
    return value


def array_sha256(array: np.ndarray) -> str:
    """Hex sha256 of an array's C-order bytes: verifies converted content independently of the file format."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
