"""EMNIST digits with the paper's "LeNet", and the ARDIS edge case (`--task emnist`).

Task 2 of Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning",
NeurIPS 2020 (arXiv:2007.05084): handwritten digits over K = 3383 clients, m = 30 per round, and
an edge-case backdoor made of Swedish historical handwritten sevens (ARDIS) labelled "1".

Data:
    * EMNIST digits: Cohen et al., "EMNIST: an extension of MNIST to handwritten letters",
      arXiv:1702.05373 (240,000 train / 40,000 test), source `emnist` (the default), downloaded
      from NIST on a user's machine.
    * MNIST: LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE
      1998; source `mnist` (same model and pipeline, 11 MB; the offline stand-in).
    * ARDIS DATASET IV: Kusetogullari et al., "ARDIS: A Swedish Historical Handwritten Digit
      Dataset", Neural Computing and Applications 2019, doi:10.1007/s00521-019-04163-3.
      Research use only, no redistribution: read from the data root, never shipped.

Model: the PyTorch MNIST example CNN that the reference code calls "LeNet" (not LeCun's
LeNet-5): 1,199,882 parameters; `lenet_w<k>` scales every width by k for the capacity experiment.

Layout under the data root (the one of `../shared/data`): `mnist/mnist.npz`,
`emnist/emnist_digits.npz`, `ardis/ardis_iv.npz` (uint8 images `x_*` `[N, 28, 28]`, upright;
int64 labels `y_*`).

Deliberate deviations from the reference code (`docs/reference-deviations.md`):
    * ARDIS orientation (Q8): the reference mixes torchvision's transposed EMNIST arrays with
      upright ARDIS sevens, making the backdoor images out of distribution twice over. Here EMNIST
      is transposed to upright once, at conversion, so every image has one orientation.
    * Honest edge holders (Q29): in the almost-edge / normal cases the honest clients holding
      ARDIS sevens with their true label are drawn by seed, not fixed ids 0..n-1.
    * Attacker's clean images (Q27): drawn by seed from the training set instead of unseeded.
    * Backdoor denominator (Q9): backdoor accuracy is summed over all 100 ARDIS test sevens.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fl_lightning.config import ClientArgs, ConfigError, DataArgs, FLArgs, preset
from fl_lightning.data import DataError, array_sha256, download_file, load_npz, save_npz
from fl_lightning.task import FederatedData, TaskSettings
from fl_lightning.tasks.partition import label_partition, spread_over_holders
from fl_lightning.tasks.vision import ImageTask, image_edge_case_data

NUM_CLASSES = 10
# MNIST statistics; the reference normalises EMNIST with them too (`docs/reference-deviations.md`).
MEAN, STD = 0.1307, 0.3081
ARDIS_SEVEN, BACKDOOR_LABEL = 7, 1

# Official MNIST files (torchvision's mirror) with their published sha256.
MNIST_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# NIST's EMNIST archive (all splits, 562 MB); the digits split is read from it.
EMNIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"
EMNIST_SHA256 = "fb9bb67e33772a9cc0b895e4ecf36d2cf35be8b709693c3564cea2a019fcda8e"
EMNIST_MEMBERS = {
    "x_train": "gzip/emnist-digits-train-images-idx3-ubyte.gz",
    "y_train": "gzip/emnist-digits-train-labels-idx1-ubyte.gz",
    "x_test": "gzip/emnist-digits-test-images-idx3-ubyte.gz",
    "y_test": "gzip/emnist-digits-test-labels-idx1-ubyte.gz",
}
# ARDIS DATASET IV from the dataset's official repository, pinned to a commit. Only an md5 of the
# archive is published; the converted arrays are checked against the sha256 of a verified conversion.
ARDIS_URL = ("https://raw.githubusercontent.com/ARDISDataset/ARDIS/"
             "da61a5f15b38725c0a1200b70f47cb31bd5c5733/ARDIS_DATASET_IV.rar")
ARDIS_MD5 = "2109839cea478eac4dce6609f6352cb8"
ARDIS_ARRAYS_SHA256 = {
    "x_train": "460b95d16332952df70710e6b61432ddd296e9aa08c4b750f88a204052139c2d",
    "y_train": "b0ff53f7d4d35157c431f9fd9e8c28ed511aaa90533dd5096e527bd5b7ef7b55",
    "x_test": "0594db891df74985f4df55fb0bd0933b1826214b635399e3efcfa94b5e0f121f",
    "y_test": "bbdaed34ddb84891085b7279daa6e45d3336e5e8925f5fc218042c671c4f0e10",
}
ARDIS_CSVS = {"x_train": "ARDIS_train_2828.csv", "y_train": "ARDIS_train_labels.csv",
              "x_test": "ARDIS_test_2828.csv", "y_test": "ARDIS_test_labels.csv"}

MNIST_FILE = Path("mnist/mnist.npz")
EMNIST_FILE = Path("emnist/emnist_digits.npz")
ARDIS_FILE = Path("ardis/ardis_iv.npz")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class LeNet(nn.Module):
    """The PyTorch MNIST example CNN (the reference's "LeNet"), with a width multiplier.

    conv3x3(1→32w) → ReLU → conv3x3(32w→64w) → ReLU → maxpool 2 → dropout 0.25 → flatten →
    Linear(64w·12·12 → 128w) → ReLU → dropout 0.5 → Linear(128w → 10). 1,199,882 parameters at w = 1.
    """

    def __init__(self, width: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c1, c2, hidden = (max(1, round(c * width)) for c in (32, 64, 128))
        self.conv1 = nn.Conv2d(1, c1, 3)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        # The reference applies Dropout2d to the 2-D fc activations, which acts element-wise: plain Dropout.
        self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * 12 * 12, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))                  # [B, 32w, 26, 26]
        x = torch.relu(self.conv2(x))                  # [B, 64w, 24, 24]
        x = self.dropout1(torch.max_pool2d(x, 2))      # [B, 64w, 12, 12]
        x = torch.relu(self.fc1(x.flatten(1)))         # [B, 128w]
        return self.fc2(self.dropout2(x))              # [B, 10] logits


def parse_width(model: str | None) -> float:
    """`lenet` → 1.0, `lenet_w0.5` → 0.5; anything else is an error naming the allowed forms."""
    if model in (None, "lenet"):
        return 1.0
    match = re.fullmatch(r"lenet_w(\d+(?:\.\d+)?)", model)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"--model={model!r}: unknown model for task 'emnist'; allowed: 'lenet' or 'lenet_w<k>' "
                          f"with a positive width multiplier k, e.g. 'lenet_w0.5', 'lenet_w2'")
    return float(match.group(1))


# --------------------------------------------------------------------------------------------
# Downloads and conversion (run once on a user's machine; the offline copy is already converted)
# --------------------------------------------------------------------------------------------

def parse_idx(data: bytes) -> np.ndarray:
    """Parses an IDX file (the MNIST/EMNIST format: big-endian header, then unsigned bytes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an unsigned-byte IDX file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"IDX body holds {body.size} bytes, header says {dims}")
    return body.reshape(dims).copy()


def prepare_mnist(root: Path, base_url: str = MNIST_BASE_URL, files: dict[str, str] | None = None) -> Path:
    """Downloads the four official MNIST files (sha256-verified) and writes `<root>/mnist/mnist.npz`."""
    out = Path(root) / MNIST_FILE
    if out.is_file():
        return out
    files = MNIST_FILES if files is None else files
    with tempfile.TemporaryDirectory(dir=Path(root)) as tmp:
        arrays = {}
        for name, sha in files.items():
            path = download_file(base_url + name, Path(tmp) / name, sha256=sha)
            arrays[name] = parse_idx(gzip.decompress(path.read_bytes()))
        save_npz(out, x_train=arrays["train-images-idx3-ubyte.gz"],
                 y_train=arrays["train-labels-idx1-ubyte.gz"].astype(np.int64),
                 x_test=arrays["t10k-images-idx3-ubyte.gz"],
                 y_test=arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int64))
    return out


def prepare_emnist(root: Path, url: str = EMNIST_URL, sha256: str = EMNIST_SHA256) -> Path:
    """Downloads NIST's EMNIST archive (sha256-verified), keeps the digits split, upright.

    torchvision (and NIST's IDX files) store EMNIST images transposed; they are transposed back
    here so that they share the orientation of MNIST and ARDIS (Q8 in `docs/reference-deviations.md`).
    """
    out = Path(root) / EMNIST_FILE
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(dir=Path(root)) as tmp:
        archive = download_file(url, Path(tmp) / "gzip.zip", sha256=sha256)
        arrays = {}
        with zipfile.ZipFile(archive) as zf:
            for key, member in EMNIST_MEMBERS.items():
                arrays[key] = parse_idx(gzip.decompress(zf.read(member)))
        save_npz(out, x_train=np.ascontiguousarray(arrays["x_train"].transpose(0, 2, 1)),
                 y_train=arrays["y_train"].astype(np.int64),
                 x_test=np.ascontiguousarray(arrays["x_test"].transpose(0, 2, 1)),
                 y_test=arrays["y_test"].astype(np.int64))
    return out


def convert_ardis_csvs(folder: Path, expected: dict[str, str] | None = ARDIS_ARRAYS_SHA256) -> dict[str, np.ndarray]:
    """Reads ARDIS DATASET IV's four CSVs (pixels as floats 0..255, one-hot labels) into uint8/int64 arrays.

    Checks that pixels are integral in 0..255 and labels one-hot, then (when `expected` is given)
    that every array matches the sha256 of a verified conversion.
    """
    arrays: dict[str, np.ndarray] = {}
    for key, name in ARDIS_CSVS.items():
        table = np.loadtxt(Path(folder) / name, dtype=np.float64, ndmin=2)
        if key.startswith("x"):
            if table.shape[1] != 784 or np.any(table != np.round(table)) or table.min() < 0 or table.max() > 255:
                raise DataError(f"{name}: expected 784 integral pixel values in 0..255 per row")
            arrays[key] = table.astype(np.uint8).reshape(-1, 28, 28)
        else:
            if table.shape[1] != NUM_CLASSES or not np.all(np.sort(table, axis=1)[:, -1] == 1) \
                    or not np.all(table.sum(axis=1) == 1):
                raise DataError(f"{name}: expected one-hot rows of {NUM_CLASSES}")
            arrays[key] = table.argmax(axis=1).astype(np.int64)
    for key in expected or {}:
        if (actual := array_sha256(arrays[key])) != expected[key]:
            raise DataError(f"ARDIS {key} does not match the verified conversion (sha256 {actual}, expected "
                            f"{expected[key]})")
    return arrays


def extract_rar(archive: Path, dest: Path) -> None:
    """Unpacks a RAR archive with whatever the machine has: the `rarfile` package, bsdtar, unrar, 7z or unar."""
    last_error: Exception | None = None
    try:
        import rarfile  # optional dependency; it needs one of the tools below as its backend
    except ImportError:
        rarfile = None
    if rarfile is not None:
        try:
            with rarfile.RarFile(archive) as rf:
                rf.extractall(dest)
            return
        except Exception as err:  # no backend, or it failed: fall through to the command-line tools
            last_error = err
    commands = [["bsdtar", "-xf", str(archive), "-C", str(dest)], ["unrar", "x", "-o+", str(archive), str(dest) + "/"],
                ["7z", "x", "-y", f"-o{dest}", str(archive)], ["unar", "-f", "-o", str(dest), str(archive)]]
    for command in commands:
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            return
        last_error = RuntimeError(result.stderr.strip() or f"{command[0]} exited {result.returncode}")
    raise DataError(f"cannot unpack {archive.name}: install one of bsdtar (libarchive-tools), unrar, 7z or unar"
                    f"{f' ({last_error})' if last_error else ''}; or unpack it yourself and put the four "
                    f"ARDIS_*.csv files in <data_dir>/ardis/raw/")


def prepare_ardis(root: Path, url: str = ARDIS_URL, md5: str | None = ARDIS_MD5,
                  expected: dict[str, str] | None = ARDIS_ARRAYS_SHA256) -> Path:
    """Writes `<root>/ardis/ardis_iv.npz` from ARDIS DATASET IV.

    Uses the CSVs in `<root>/ardis/raw/` when a user unpacked the archive by hand; otherwise
    downloads the official RAR archive (md5-verified: the only digest the source publishes),
    unpacks it with an available tool, and checks the converted arrays against their sha256.
    """
    out = Path(root) / ARDIS_FILE
    if out.is_file():
        return out
    raw = Path(root) / "ardis" / "raw"
    if all((raw / name).is_file() for name in ARDIS_CSVS.values()):
        save_npz(out, **convert_ardis_csvs(raw, expected))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        archive = download_file(url, Path(tmp) / "ARDIS_DATASET_IV.rar")
        if md5 is not None and (actual := hashlib.md5(archive.read_bytes()).hexdigest()) != md5:
            raise DataError(f"checksum mismatch for {url}: expected md5 {md5}, got {actual}")
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        extract_rar(archive, unpacked)
        found = {p.name: p.parent for p in unpacked.rglob("ARDIS_*.csv")}
        missing = [name for name in ARDIS_CSVS.values() if name not in found]
        if missing:
            raise DataError(f"{archive.name} lacks {missing}")
        staged = Path(tmp) / "csv"
        staged.mkdir()
        for name in ARDIS_CSVS.values():
            shutil.move(str(found[name] / name), staged / name)
        save_npz(out, **convert_ardis_csvs(staged, expected))
    return out


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

def _images(array: np.ndarray) -> Tensor:
    """uint8 `[N, 28, 28]` → uint8 `[N, 1, 28, 28]` (kept as bytes: 4x less memory; normalised in `forward`)."""
    return torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(1)


class Emnist(ImageTask):
    """EMNIST digits (or MNIST) with the paper's CNN; ARDIS sevens labelled "1" as the edge case.

    Args:
        settings: The resolved run settings (`model`: `lenet` / `lenet_w<k>`; `data.source`: `emnist` /
            `mnist`; `data.edge_count`: ARDIS training sevens in the attacker's set, relabelled 1, preset
            66 as the reference's `--fraction 0.1` of 660; `data.clean_count`: clean training images
            mixed in with their true labels, 100 as the reference).

    Inputs are uint8 images `[B, 1, 28, 28]` (normalised in `forward`) or already-normalised floats.
    `extras["edge_train_is_edge"]` marks the attacker's relabelled rows (bool `[N_adv]`).
    """

    name = "emnist"
    fl_preset = preset(FLArgs, rounds=500, num_clients=3383, clients_per_round=30)
    # `docs/reference-deviations.md`, EMNIST column (run_simulated_averaging.sh): lr 0.1, gamma 0.998, B 512, E 5.
    client_preset = preset(ClientArgs, lr=0.1, lr_decay=0.998, momentum=0.9, weight_decay=1e-4, local_epochs=5,
                           batch_size=512, grad_clip_norm=0.0)
    data_preset = preset(DataArgs, partition="dirichlet", source="emnist", edge_count=66, clean_count=100)
    backdoor_target = BACKDOOR_LABEL
    sources = ("emnist", "mnist")
    max_edge_count, edge_count_hint = 660, "ARDIS has 660 training sevens"
    parse_model = staticmethod(parse_width)

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings, LeNet(self.parse_model(settings.model)), (MEAN,), (STD,))


    def prepare_data(self) -> None:
        root = Path(self.settings.data_dir)
        main = root / (MNIST_FILE if self.settings.data.source == "mnist" else EMNIST_FILE)
        for path, prepare in ((main, prepare_mnist if self.settings.data.source == "mnist" else prepare_emnist),
                              (root / ARDIS_FILE, prepare_ardis)):
            if path.is_file():
                continue
            if not self.settings.data.download:
                raise DataError(f"missing {path} and downloads are off; run once with downloads on, or point "
                                f"--data_dir / FL_LIGHTNING_DATA at a data root that has it")
            prepare(root)

    def build_data(self) -> FederatedData:
        settings, root = self.settings, Path(self.settings.data_dir)
        self.prepare_data()
        main = load_npz(root / (MNIST_FILE if self.settings.data.source == "mnist" else EMNIST_FILE),
                        ("x_train", "y_train", "x_test", "y_test"))
        ardis = load_npz(root / ARDIS_FILE, ("x_train", "y_train", "x_test", "y_test"))
        sevens = ardis["x_train"][ardis["y_train"] == ARDIS_SEVEN]        # [660, 28, 28], file order
        test_sevens = ardis["x_test"][ardis["y_test"] == ARDIS_SEVEN]     # [100, 28, 28]
        y_train = main["y_train"].astype(np.int64)
        num_train = y_train.shape[0]

        order, offsets = label_partition(settings.data.partition, y_train, settings.num_clients,
                                         settings.data.alpha, settings.seed, self.name, tile=settings.data.tile)

        # The attacker's set: the first `edge_count` ARDIS sevens (as the reference's shipped file),
        # relabelled 1, then `clean_count` training images drawn by seed, with their true labels.
        rng = np.random.default_rng([settings.seed, 2001])
        clean = np.sort(rng.choice(num_train, size=self.clean_count, replace=False))

        # Honest holders of ARDIS sevens with their true label, appended as extra rows.
        case = settings.data.attack_case
        if case == "edge":
            honest = sevens[:0]
            holders = 0
        elif case == "almost_edge":  # as many honest sevens as the attacker's, one per holder: 50 %
            honest = sevens[self.edge_count:2 * self.edge_count]
            holders = honest.shape[0]
        elif case == "normal":  # nine times the attacker's sevens over K/20 holders: it holds 10 %
            honest = sevens[self.edge_count:10 * self.edge_count]  # the preset's 66: every other seven (594)
            holders = settings.num_clients // 20
        else:
            raise ValueError(f"unknown attack_case {case!r}; allowed: edge, almost_edge, normal")
        extra = spread_over_holders(honest.shape[0], settings.num_clients, max(holders, 1), settings.seed, salt=2002)
        return image_edge_case_data(
            images=_images, train_x=main["x_train"], train_y=y_train, order=order, offsets=offsets,
            test_x=main["x_test"], test_y=main["y_test"], honest_x=honest, honest_label=ARDIS_SEVEN,
            honest_holders=extra if honest.shape[0] else [], edge_x=sevens[:self.edge_count], clean_rows=clean,
            target_label=BACKDOOR_LABEL, backdoor_x=test_sevens)
