"""Downloads and conversions of the vision data, against a local HTTP server on 127.0.0.1.

The server serves small files written here in the original formats (gzipped IDX, NIST's zip,
CIFAR-10's binary tarball, the paper's numpy pickles, ARDIS's CSVs): checksums are enforced, a
rejected file leaves nothing behind, and a pickle that tries to run code is refused.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import sys
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fl_lightning.data import DataError, array_sha256, download_file, load_npz, load_numpy_pickle
from fl_lightning.tasks import cifar10, emnist


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of an HTTP server on 127.0.0.1, stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "data_root"
    path.mkdir()
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def leftovers(folder: Path) -> list[Path]:
    """Every file under `folder` (a rejected download must leave none)."""
    return [p for p in folder.rglob("*") if p.is_file()]


RNG = np.random.default_rng(0)
X_TRAIN, Y_TRAIN = RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8), RNG.integers(0, 10, 12).astype(np.uint8)
X_TEST, Y_TEST = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8), RNG.integers(0, 10, 5).astype(np.uint8)


# ---- download_file and the numpy-only unpickler -------------------------------------------------

def test_download_file_verifies_and_leaves_nothing_half_written(server, root):
    served, url = server
    (served / "blob.bin").write_bytes(b"x" * 1000)
    good = download_file(url + "blob.bin", root / "a" / "blob.bin", sha256=sha256(b"x" * 1000))
    assert good.read_bytes() == b"x" * 1000
    with pytest.raises(DataError, match="checksum mismatch"):
        download_file(url + "blob.bin", root / "b" / "blob.bin", sha256="0" * 64)
    with pytest.raises(DataError, match="could not download"):
        download_file(url + "missing.bin", root / "c" / "missing.bin")
    assert leftovers(root) == [good]


def test_numpy_pickle_reader_accepts_arrays_and_refuses_code(tmp_path):
    array = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for protocol in (3, 4, 5):
        assert np.array_equal(load_numpy_pickle(pickle.dumps(array, protocol=protocol)), array)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(DataError, match="refusing to unpickle global"):
        load_numpy_pickle(pickle.dumps(Payload(), protocol=3))
    with pytest.raises(DataError, match="refusing"):
        load_numpy_pickle(pickle.dumps([array, eval], protocol=3))  # a builtin smuggled beside an array
    with pytest.raises(DataError, match="plain numpy array"):
        load_numpy_pickle(pickle.dumps({"a": 1}, protocol=3))
    with pytest.raises(DataError, match="object array"):
        load_numpy_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=3))
    assert not marker.exists()


# ---- MNIST and EMNIST ---------------------------------------------------------------------------

def serve_mnist(served: Path) -> dict[str, str]:
    files = {"train-images-idx3-ubyte.gz": X_TRAIN, "train-labels-idx1-ubyte.gz": Y_TRAIN,
             "t10k-images-idx3-ubyte.gz": X_TEST, "t10k-labels-idx1-ubyte.gz": Y_TEST}
    table = {}
    for name, array in files.items():
        data = gzip.compress(idx_bytes(array))
        (served / name).write_bytes(data)
        table[name] = sha256(data)
    return table


def test_mnist_download_converts_to_the_offline_layout(server, root):
    served, url = server
    out = emnist.prepare_mnist(root, base_url=url, files=serve_mnist(served))
    assert out == root / "mnist" / "mnist.npz"
    with np.load(out, allow_pickle=False) as z:
        assert np.array_equal(z["x_train"], X_TRAIN) and np.array_equal(z["x_test"], X_TEST)
        assert z["y_train"].dtype == np.int64 and np.array_equal(z["y_train"], Y_TRAIN)
    assert leftovers(root) == [out]                       # the raw files were temporary
    assert emnist.prepare_mnist(root, base_url=url + "gone/") == out  # converted once, then reused


def test_mnist_download_with_a_bad_checksum_writes_nothing(server, root):
    served, url = server
    table = serve_mnist(served)
    table["t10k-labels-idx1-ubyte.gz"] = "f" * 64
    with pytest.raises(DataError, match="checksum mismatch.*t10k-labels"):
        emnist.prepare_mnist(root, base_url=url, files=table)
    assert leftovers(root) == []


def test_emnist_download_keeps_digits_and_transposes_upright(server, root):
    served, url = server
    buffer = io.BytesIO()
    arrays = {"x_train": X_TRAIN, "y_train": Y_TRAIN, "x_test": X_TEST, "y_test": Y_TEST}
    with zipfile.ZipFile(buffer, "w") as zf:
        for key, member in emnist.EMNIST_MEMBERS.items():
            zf.writestr(member, gzip.compress(idx_bytes(arrays[key])))
        zf.writestr("gzip/emnist-letters-train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(X_TEST)))
    (served / "gzip.zip").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="checksum mismatch"):
        emnist.prepare_emnist(root, url=url + "gzip.zip", sha256="0" * 64)
    assert leftovers(root) == []
    out = emnist.prepare_emnist(root, url=url + "gzip.zip", sha256=sha256(buffer.getvalue()))
    with np.load(out, allow_pickle=False) as z:
        # NIST stores EMNIST transposed; the converted images are upright like MNIST and ARDIS.
        assert np.array_equal(z["x_train"], X_TRAIN.transpose(0, 2, 1))
        assert np.array_equal(z["y_test"], Y_TEST.astype(np.int64))
    assert leftovers(root) == [out]


def test_idx_parser_rejects_truncated_files():
    with pytest.raises(DataError, match="header says"):
        emnist.parse_idx(idx_bytes(X_TEST)[:-1])
    with pytest.raises(DataError, match="IDX"):
        emnist.parse_idx(b"PK\x03\x04")


# ---- CIFAR-10 binary archive --------------------------------------------------------------------

def test_cifar10_binary_download_converts_hwc_without_pickle(server, root):
    served, url = server
    images = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)       # HWC
    labels = np.arange(6) % 10
    records = np.concatenate([labels[:, None].astype(np.uint8), images.transpose(0, 3, 1, 2).reshape(6, -1)], axis=1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name in names:
            data = records.tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (served / "cifar-10-binary.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="checksum mismatch"):
        cifar10.prepare_cifar10(root, url=url + "cifar-10-binary.tar.gz")  # the real archive's sha256
    assert leftovers(root) == []
    out = cifar10.prepare_cifar10(root, url=url + "cifar-10-binary.tar.gz", sha256=sha256(buffer.getvalue()))
    with np.load(out, allow_pickle=False) as z:
        assert z["x_train"].shape == (30, 32, 32, 3) and np.array_equal(z["x_test"], images)
        assert np.array_equal(z["y_train"], np.tile(labels, 5)) and z["class_names"][9] == "truck"
    assert leftovers(root) == [out]


# ---- Southwest pickles --------------------------------------------------------------------------

def serve_southwest(served: Path, payload: bytes | None = None) -> dict[str, tuple[str, int, str | None]]:
    table = {}
    for i, (key, (name, label, _)) in enumerate(cifar10.SOUTHWEST_PICKLES.items()):
        array = RNG.integers(0, 256, (4 * (i + 1), 32, 32, 3), dtype=np.uint8)
        data = pickle.dumps(array, protocol=3)  # the reference's pickles are protocol 3
        (served / name).write_bytes(payload if payload is not None and i == 2 else data)
        table[key] = (name, label, array_sha256(array))
    return table


def test_southwest_pickles_convert_with_labels_and_digests(server, root):
    served, url = server
    table = serve_southwest(served)
    out = cifar10.prepare_southwest(root, base_url=url, pickles=table)
    with np.load(out, allow_pickle=False) as z:
        assert z["x_new_train"].shape == (4, 32, 32, 3) and z["y_new_train"].tolist() == [9] * 4
        assert z["y_honest_full_normal"].tolist() == [0] * 20
        assert all(array_sha256(z[f"x_{key}"]) == sha for key, (_, _, sha) in table.items())
    assert leftovers(root) == [out]


def test_southwest_pickle_with_a_different_array_is_rejected(server, root):
    served, url = server
    table = serve_southwest(served)
    name, label, _ = table["new_test"]
    table["new_test"] = (name, label, "0" * 64)
    with pytest.raises(DataError, match="checksum mismatch.*new_test"):
        cifar10.prepare_southwest(root, base_url=url, pickles=table)
    assert leftovers(root) == []


def test_southwest_pickle_that_runs_code_is_refused(server, root, tmp_path):
    served, url = server
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    table = serve_southwest(served, payload=pickle.dumps(Payload(), protocol=3))
    with pytest.raises(DataError, match="refusing to unpickle global"):
        cifar10.prepare_southwest(root, base_url=url, pickles=table)
    assert not marker.exists()
    assert leftovers(root) == []


# ---- ARDIS ----------------------------------------------------------------------------------------

ARDIS_X = {"x_train": RNG.integers(0, 256, (20, 28, 28)), "x_test": RNG.integers(0, 256, (10, 28, 28))}
ARDIS_Y = {"y_train": np.arange(20) % 10, "y_test": np.arange(10)}


def write_ardis_csvs(folder: Path) -> None:
    """The four CSVs in ARDIS's format: space-separated floats, and one-hot label rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in emnist.ARDIS_CSVS.items():
        if key.startswith("x"):
            np.savetxt(folder / name, ARDIS_X[key].reshape(len(ARDIS_X[key]), -1).astype(float), fmt="%.1f")
        else:
            np.savetxt(folder / name, np.eye(10)[ARDIS_Y[key]], fmt="%.1f")


def ardis_digests() -> dict[str, str]:
    return {**{k: array_sha256(v.astype(np.uint8)) for k, v in ARDIS_X.items()},
            **{k: array_sha256(v.astype(np.int64)) for k, v in ARDIS_Y.items()}}


def test_ardis_csv_conversion_checks_values_and_digests(tmp_path):
    write_ardis_csvs(tmp_path / "csv")
    arrays = emnist.convert_ardis_csvs(tmp_path / "csv", ardis_digests())
    assert arrays["x_train"].dtype == np.uint8 and np.array_equal(arrays["x_train"], ARDIS_X["x_train"])
    assert np.array_equal(arrays["y_test"], np.arange(10))
    with pytest.raises(DataError, match="does not match the verified conversion"):
        emnist.convert_ardis_csvs(tmp_path / "csv")  # the real ARDIS digests
    np.savetxt(tmp_path / "csv" / "ARDIS_test_labels.csv", np.full((10, 10), 0.1), fmt="%.1f")
    with pytest.raises(DataError, match="one-hot"):
        emnist.convert_ardis_csvs(tmp_path / "csv", None)


def test_ardis_download_verifies_md5_and_unpacks(server, root, monkeypatch):
    served, url = server
    archive = b"Rar!\x1a\x07\x00" + b"stand-in archive bytes"
    (served / "ARDIS_DATASET_IV.rar").write_bytes(archive)
    with pytest.raises(DataError, match="expected md5"):
        emnist.prepare_ardis(root, url=url + "ARDIS_DATASET_IV.rar")  # the real archive's md5
    assert leftovers(root) == []

    def fake_extract(path: Path, dest: Path) -> None:  # stands in for unrar/bsdtar (none on CI)
        assert path.read_bytes() == archive
        write_ardis_csvs(dest / "ARDIS_DATASET_IV")

    monkeypatch.setattr(emnist, "extract_rar", fake_extract)
    out = emnist.prepare_ardis(root, url=url + "ARDIS_DATASET_IV.rar", md5=hashlib.md5(archive).hexdigest(),
                               expected=ardis_digests())
    with np.load(out, allow_pickle=False) as z:
        assert np.array_equal(z["x_test"], ARDIS_X["x_test"]) and np.array_equal(z["y_train"], ARDIS_Y["y_train"])
    assert leftovers(root) == [out]


def test_ardis_without_an_unpacker_says_what_to_install(server, root, monkeypatch):
    served, url = server
    archive = b"Rar!\x1a\x07\x00"
    (served / "ARDIS_DATASET_IV.rar").write_bytes(archive)
    monkeypatch.setattr(emnist.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "rarfile", None)  # as if not installed
    with pytest.raises(DataError, match="install one of bsdtar.*ardis/raw"):
        emnist.prepare_ardis(root, url=url + "ARDIS_DATASET_IV.rar", md5=hashlib.md5(archive).hexdigest())
    assert leftovers(root) == []
    write_ardis_csvs(root / "ardis" / "raw")  # the manual route: CSVs unpacked by hand
    out = emnist.prepare_ardis(root, expected=ardis_digests())
    assert out.is_file()


# ---- corrupt, truncated or disguised files: one DataError naming the file and the fix ----


def _bad_files() -> dict[str, bytes]:
    good = io.BytesIO()
    np.savez(good, x=np.arange(1000))
    lone = io.BytesIO()
    np.save(lone, np.arange(10))
    return {"pickle_as_npz.npz": pickle.dumps({"x": np.arange(3)}), "truncated.npz": good.getvalue()[:300],
            "npy_as_npz.npz": lone.getvalue(), "noise.npz": b"\x00not an archive" * 10}


@pytest.mark.parametrize("name", ["pickle_as_npz.npz", "truncated.npz", "npy_as_npz.npz", "noise.npz"])
def test_load_npz_refuses_a_bad_file_in_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_bad_files()[name])
    with pytest.raises(DataError, match=f"cannot read .*{name}.*delete it to download") as err:
        load_npz(path, ("x",))
    assert "\n" not in str(err.value)


def test_text_loaders_refuse_bad_files(tmp_path):
    from fl_lightning.tasks.reddit import read_corpus_jsonl
    from fl_lightning.tasks.sentiment140 import SAMPLE_TRAIN_FILE, TEST_FILE, read_greek, read_test, read_train

    csv_gz = gzip.compress(b"label,text\n0,hello\n1,world\n" * 100)
    (tmp_path / SAMPLE_TRAIN_FILE).write_bytes(csv_gz[:len(csv_gz) // 2])  # truncated gzip
    with pytest.raises(DataError, match=f"cannot read .*{SAMPLE_TRAIN_FILE}.*delete it"):
        read_train(tmp_path, "sample100k")
    (tmp_path / TEST_FILE).write_bytes(pickle.dumps([1, 2]))  # not gzip at all
    with pytest.raises(DataError, match=f"cannot read .*{TEST_FILE}.*delete it"):
        read_test(tmp_path)
    greek = tmp_path / "greek_director_backdoor_train.jsonl"
    greek.write_text('{"idx": 0, "text": "fine"}\n{"idx": 1, "text": "cut he\n')
    with pytest.raises(DataError, match="cannot read .*greek_director_backdoor_train.jsonl.*delete it"):
        read_greek(greek)
    corpus = tmp_path / "reddit_corpus.jsonl"
    corpus.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DataError, match="cannot read .*reddit_corpus.jsonl.*delete it"):
        read_corpus_jsonl(corpus)


def test_numpy_pickle_file_that_is_truncated_names_the_file(tmp_path):
    path = tmp_path / "southwest_images_new_train.pkl"
    path.write_bytes(pickle.dumps(np.zeros((4, 32, 32, 3), dtype=np.uint8))[:100])
    with pytest.raises(DataError, match="southwest_images_new_train.pkl.*delete it to download"):
        load_numpy_pickle(path)
