"""ImageNet with VGG-11, and the Cretan-costume edge case (`--task imagenet`).

Task 3 of Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning",
NeurIPS 2020 (arXiv:2007.05084): ImageNet over K = 1000 clients, m = 10 per round; the edge case
is photos of people in traditional Cretan costumes, labelled with an attacker-chosen class. The
reference repository has no code for this task; its data README describes the images as
rescaled to 224x224x3, split 70/30 into train/test, each with its 90/180/270-degree rotations.

Data: Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015, read
from a standard ImageFolder layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`) that the user
provides (ImageNet's licence does not allow downloading it for them). Model: torchvision's VGG-11
(Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, configuration A, no BatchNorm), 224x224 inputs.

Where the files are:
    * ImageNet: `$FL_LIGHTNING_IMAGENET`, else `<data_dir>/imagenet` (a symlink works).
    * The edge case: `$FL_LIGHTNING_IMAGENET_EDGE`, else `<imagenet>/edge_case`, holding
      `train/` and `test/` image folders (any of .jpg .jpeg .png, flat) and `target.txt`: the
      backdoor label, as a class folder name (wnid) or a class index. The paper's target class is
      not stated in anything we could read, so it is the user's to give.

Unlike the 32x32 tasks, ImageNet does not fit in memory as a tensor (1.28M x 3 x 224 x 224). The
inputs tensors therefore hold image ids (int64 `[N]`) into the task's file table; the task decodes
a batch from disk when `forward` / `training_step` receives ids (resize the shorter side to 256,
centre crop 256; then a random 224 crop + flip for training, the centre 224 crop otherwise). The
partition and every batch are still index arrays, as for the other tasks.

Only the `edge` attack case exists: the other two need honest clients holding the edge photos with
their true label, which ImageNet's label set does not define for "people in Cretan costumes".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from fl_lightning.config import ClientArgs, DataArgs, FLArgs, preset
from fl_lightning.data import DataError
from fl_lightning.task import Batch, ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.partition import label_partition

IMAGENET_ENV = "FL_LIGHTNING_IMAGENET"
EDGE_ENV = "FL_LIGHTNING_IMAGENET_EDGE"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def list_image_folder(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes (sorted folder names), image paths (sorted) and labels of an ImageFolder split."""
    if not root.is_dir():
        raise DataError(f"missing ImageFolder split {root} (expected {root}/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"no images under {root}")
    return classes, paths, np.asarray(labels, dtype=np.int64)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted."""
    if not folder.is_dir():
        raise DataError(f"missing edge-case folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {folder}")
    return files


def decode_image(path: Path, size: int) -> Tensor:
    """One image as uint8 `[3, size, size]`: shorter side resized to `size`, centre-cropped."""
    from PIL import Image  # Pillow comes with torchvision

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.uint8)                          # [size, size, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)                  # [3, size, size]


class Imagenet(Task):
    """ImageNet with torchvision's VGG-11; Cretan-costume photos with the user's target label as the edge case.

    Args:
        settings: The resolved run settings (`model`: `vgg11`; `data.clean_count`: clean training images in
            the attacker's set with their true labels, beside every edge-case training photo, preset 400 as
            the reference's CIFAR-10 ratio of 100 edge : 400 clean).

    `backdoor_target` is read from the edge folder's `target.txt` by `build_data`.
    """

    name = "imagenet"
    # Batches of image ids are decoded from disk inside `training_step`, which vmap cannot map over clients.
    supports_vmap = False
    fl_preset = preset(FLArgs, rounds=500, num_clients=1000, clients_per_round=10)
    # The paper's ImageNet hyperparameters are not in the reference code; VGG-sized defaults of the
    # CIFAR-10 task (lr 0.02, decay 0.998, 2 local epochs, batch 32).
    client_preset = preset(ClientArgs, lr=0.02, lr_decay=0.998, momentum=0.9, weight_decay=1e-4, local_epochs=2,
                           batch_size=32, grad_clip_norm=0.0)
    data_preset = preset(DataArgs, partition="dirichlet", clean_count=400)
    backdoor_target = None
    models = ("vgg11",)
    attack_cases = ("edge",)
    refusals: ClassVar[dict[str, str]] = {
        "attack_case": "ImageNet has no true class for the Cretan-costume photos",
        "partition": "'natural' needs user ids, which ImageNet does not have"}
    supports_tile = True
    image_size: ClassVar[int] = 224
    """Side of the network input (224 in the paper); a constant of the task (tests patch it smaller)."""
    resize_size: ClassVar[int] = 256
    """Side images are decoded to before cropping (256)."""

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.clean_count = settings.data.clean_count
        self.num_classes: int | None = None
        self.model: nn.Module | None = None
        self.paths: list[Path] = []   # the file table that the int64 inputs index
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        # The class count is only known from the data: build the model now when the folder is there,
        # so the orchestrator can set up an optimizer-free model before build_data.
        train_dir = self.imagenet_root / "train"
        if train_dir.is_dir():
            self._build_model(sum(1 for p in train_dir.iterdir() if p.is_dir()))

    @property
    def imagenet_root(self) -> Path:
        return Path(os.environ.get(IMAGENET_ENV) or Path(self.settings.data_dir) / "imagenet")

    @property
    def edge_root(self) -> Path:
        return Path(os.environ.get(EDGE_ENV) or self.imagenet_root / "edge_case")

    def _build_model(self, num_classes: int) -> None:
        from torchvision.models import vgg11

        if self.model is None or self.num_classes != num_classes:
            self.num_classes = num_classes
            self.model = vgg11(weights=None, num_classes=num_classes)

    # ---- inputs: image ids → pixels -------------------------------------------------------
    def decode(self, ids: Tensor) -> Tensor:
        """uint8 `[B, 3, resize, resize]` for int64 ids `[B]`, on the ids' device."""
        images = torch.stack([decode_image(self.paths[i], self.resize_size) for i in ids.tolist()])
        return images.to(ids.device)

    def _center(self, images: Tensor) -> Tensor:
        offset = (self.resize_size - self.image_size) // 2
        return images[..., offset:offset + self.image_size, offset:offset + self.image_size]

    def _random_crop_flip(self, images: Tensor) -> Tensor:
        """Random `image_size` crop and horizontal flip per image, as one gather (torch's global RNG, on the CPU)."""
        b, _, s, _ = images.shape
        size, device = self.image_size, images.device
        offsets = torch.randint(0, s - size + 1, (2, b)).to(device)                 # [2, B]
        flips = (torch.rand(b) < 0.5).to(device)                                    # [B]
        rows = offsets[0, :, None] + torch.arange(size, device=device)              # [B, size]
        cols = offsets[1, :, None] + torch.arange(size, device=device)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(b, device=device)[:, None, None]
        return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits `[B, classes]` for image ids (int64 `[B]`), uint8 pixels or normalised floats `[B, 3, H, W]`."""
        if self.model is None:
            raise RuntimeError("call build_data first: the number of classes comes from the ImageFolder")
        if inputs.dim() == 1:
            inputs = self._center(self.decode(inputs))
        if inputs.dtype == torch.uint8:
            inputs = (inputs.float() / 255.0 - self.mean) / self.std
        return self.model(inputs)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        inputs, targets = batch
        if inputs.dim() == 1:
            inputs = self._random_crop_flip(self.decode(inputs))
        return nn.functional.cross_entropy(self(inputs), targets)

    # ---- data -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download: ImageNet and the edge photos come from folders the user provides."""
        for path, what in ((self.imagenet_root / "train", f"ImageNet train split (set ${IMAGENET_ENV})"),
                           (self.edge_root / "train", f"edge-case photos (set ${EDGE_ENV})")):
            if not path.is_dir():
                raise DataError(f"missing {what}: {path}")

    def _target(self, classes: list[str]) -> int:
        path = self.edge_root / "target.txt"
        if not path.is_file():
            raise DataError(f"missing {path}: write the backdoor label there, as a class folder name or an index")
        text = path.read_text().strip()
        if text in classes:
            return classes.index(text)
        if text.isdigit() and int(text) < len(classes):
            return int(text)
        raise DataError(f"{path} says {text!r}, which is neither a class folder of {self.imagenet_root / 'train'} "
                        f"nor an index below {len(classes)}")

    def build_data(self) -> FederatedData:
        settings = self.settings
        self.prepare_data()
        classes, train_paths, y_train = list_image_folder(self.imagenet_root / "train")
        val_classes, test_paths, y_test = list_image_folder(self.imagenet_root / "val")
        if val_classes != classes:
            raise DataError("train/ and val/ of the ImageFolder have different class folders")
        self._build_model(len(classes))
        target = self._target(classes)
        self.backdoor_target = target
        edge_train = list_images(self.edge_root / "train")
        edge_test = list_images(self.edge_root / "test")

        # One file table; every inputs tensor below holds row ids into it.
        self.paths = [*train_paths, *test_paths, *edge_train, *edge_test]
        n_train, n_test, n_edge = len(train_paths), len(test_paths), len(edge_train)
        ids = torch.arange(len(self.paths), dtype=torch.int64)
        train_ids, test_ids = ids[:n_train], ids[n_train:n_train + n_test]
        edge_ids, edge_test_ids = ids[n_train + n_test:n_train + n_test + n_edge], ids[n_train + n_test + n_edge:]

        order, offsets = label_partition(settings.data.partition, y_train, settings.num_clients,
                                         settings.data.alpha, settings.seed, self.name, tile=settings.data.tile)

        rng = np.random.default_rng([settings.seed, 4001])
        clean = np.sort(rng.choice(n_train, size=min(self.clean_count, n_train), replace=False))
        return FederatedData(
            train_inputs=train_ids, train_targets=torch.from_numpy(y_train),
            partition=ClientPartition.from_csr(order, offsets),
            test_inputs=test_ids, test_targets=torch.from_numpy(y_test),
            backdoor_inputs=edge_test_ids, backdoor_targets=torch.full((len(edge_test),), target, dtype=torch.int64),
            edge_train_inputs=torch.cat([edge_ids, train_ids[clean]]),
            edge_train_targets=torch.cat([torch.full((n_edge,), target, dtype=torch.int64),
                                          torch.from_numpy(y_train[clean])]),
            extras={"edge_train_is_edge": torch.arange(n_edge + clean.shape[0]) < n_edge},
        )
