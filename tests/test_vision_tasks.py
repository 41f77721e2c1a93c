"""The vision tasks on the real offline data: models, inputs, edge-case pools and the three attack cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_lightning.config import ConfigError, preset_values
from fl_lightning.data import DataError
from fl_lightning.tasks import TASKS, Task, get_task_class
from fl_lightning.tasks.cifar10 import MEAN as CIFAR_MEAN
from fl_lightning.tasks.cifar10 import STD as CIFAR_STD
from fl_lightning.tasks.cifar10 import VGG, Cifar10, dedup_groups, random_crop_flip
from fl_lightning.tasks.emnist import LeNet, parse_width
from fl_lightning.tasks.imagenet import Imagenet


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_task(task: str | type[Task], root: Path, **kw) -> Task:
    task_cls = get_task_class(task) if isinstance(task, str) else task
    return task_cls(task_cls.make_settings(root, **{"num_clients": 200, "seed": 0, **kw}))


# ---- models ---------------------------------------------------------------------------------

def test_lenet_parameter_count_and_width_multiplier():
    assert n_params(LeNet()) == 1_199_882
    half = LeNet(parse_width("lenet_w0.5"))  # 16, 32 channels, 64 hidden
    assert n_params(half) == (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 144 * 64 + 64) + (64 * 10 + 10)
    assert parse_width("lenet") == 1.0 and parse_width("lenet_w2") == 2.0
    for bad in ("vgg9", "lenet_w0", "lenet_wx"):
        with pytest.raises(ValueError, match="allowed: 'lenet'"):
            parse_width(bad)


@pytest.mark.parametrize(("name", "count"), [("vgg9", 9_225_610), ("vgg11", 9_750_922), ("vgg13", 9_935_434),
                                             ("vgg16", 15_245_130)])
def test_vgg_parameter_counts_and_forward_shape(name, count):
    model = VGG(name)
    assert n_params(model) == count
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_names_list_the_allowed_ones(shared_data):
    with pytest.raises(ValueError, match="vgg9, vgg11, vgg13, vgg16"):
        make_task(Cifar10, shared_data, model="resnet18")
    with pytest.raises(ValueError, match="allowed: emnist, mnist"):
        make_task("emnist", shared_data, source="fashion")


def test_tasks_are_registered():
    assert {"emnist", "cifar10", "imagenet"} <= set(TASKS)
    assert get_task_class("emnist").backdoor_target == 1 and get_task_class("cifar10").backdoor_target == 9
    emnist, cifar = get_task_class("emnist"), get_task_class("cifar10")
    assert preset_values(emnist.fl_preset) == {"rounds": 500, "num_clients": 3383, "clients_per_round": 30}
    assert emnist.client_preset.lr == 0.1 and emnist.client_preset.batch_size == 512
    assert cifar.fl_preset.num_clients == 200 and cifar.fl_preset.clients_per_round == 10
    assert {k: getattr(cifar.client_preset, k) for k in ("lr", "lr_decay", "local_epochs", "batch_size")} == \
        {"lr": 0.02, "lr_decay": 0.998, "local_epochs": 2, "batch_size": 32}


# ---- augmentation ---------------------------------------------------------------------------

def test_random_crop_flip_matches_a_per_image_reference():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(5)
    out = random_crop_flip(images)
    torch.manual_seed(5)  # replay the same draws
    offsets, flips = torch.randint(0, 9, (2, 6)), torch.rand(6) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(6):
        crop = padded[i, :, offsets[0, i]:offsets[0, i] + 32, offsets[1, i]:offsets[1, i] + 32]
        assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
    assert out.dtype == torch.uint8 and out.is_contiguous()
    torch.manual_seed(5)
    assert torch.equal(random_crop_flip(images), out)


# ---- EMNIST task, MNIST source, real data -----------------------------------------------------

@pytest.fixture(scope="module")
def mnist_data(shared_data):
    out = {}
    for case in ("edge", "almost_edge", "normal"):
        task = make_task("emnist", shared_data, source="mnist", attack_case=case)
        out[case] = (task, task.build_data())
    return out


def test_emnist_mnist_sizes_and_backdoor_sets(mnist_data, shared_data):
    task, data = mnist_data["edge"]
    ardis = np.load(shared_data / "ardis" / "ardis_iv.npz")
    assert data.train_inputs.shape == (60_000, 1, 28, 28) and data.train_inputs.dtype == torch.uint8
    assert data.test_inputs.shape == (10_000, 1, 28, 28)
    assert data.num_clients == 200
    assert torch.equal(torch.sort(data.partition.order).values, torch.arange(60_000))
    # Backdoor set: the 100 ARDIS test sevens, upright as stored, target label 1.
    assert torch.equal(data.backdoor_inputs[:, 0], torch.from_numpy(ardis["x_test"][ardis["y_test"] == 7]))
    assert data.backdoor_targets.tolist() == [1] * 100


def test_emnist_attacker_set_is_66_ardis_sevens_and_100_clean(mnist_data, shared_data):
    _, data = mnist_data["edge"]
    poisoned = np.load(shared_data / "edge_case" / "poisoned_emnist_ardis_fraction_0.1.npz")
    mnist = np.load(shared_data / "mnist" / "mnist.npz")
    x, y, is_edge = data.edge_train_inputs[:, 0].numpy(), data.edge_train_targets.numpy(), data.extras[
        "edge_train_is_edge"].numpy()
    assert x.shape == (166, 28, 28) and is_edge.sum() == 66
    # The 66 sevens are exactly the ARDIS rows of the paper's shipped poisoned set, labelled 1.
    assert np.array_equal(x[is_edge], poisoned["x"][poisoned["is_ardis"]]) and np.all(y[is_edge] == 1)
    # The 100 clean rows are training images with their true labels.
    flat = mnist["x_train"].reshape(60_000, -1)
    for image, label in zip(x[~is_edge], y[~is_edge], strict=True):
        match = np.flatnonzero((flat == image.reshape(-1)).all(axis=1))
        assert match.size and label in mnist["y_train"][match]


def test_emnist_attacker_set_size_comes_from_data_edge_count_and_clean_count(shared_data):
    task = make_task("emnist", shared_data, source="mnist", edge_count=30, clean_count=10)
    data = task.build_data()
    assert data.edge_train_inputs.shape[0] == 40 and int(data.extras["edge_train_is_edge"].sum()) == 30
    # The stated shares hold for any attacker set: 30 honest sevens (50 %), 270 (10 %).
    for case, honest in (("almost_edge", 30), ("normal", 270)):
        data = make_task("emnist", shared_data, source="mnist", edge_count=30, clean_count=10,
                         attack_case=case).build_data()
        assert data.train_targets.shape[0] - 60_000 == honest
    with pytest.raises(ConfigError, match=r"--data.edge_count must be in 1..660"):
        make_task("emnist", shared_data, source="mnist", edge_count=661)
    with pytest.raises(ConfigError, match=r"--data.clean_count=5: task 'sentiment140' does not take it"):
        make_task("sentiment140", shared_data, clean_count=5)


def test_emnist_attack_cases_hold_the_stated_shares(mnist_data):
    shares = {}
    for case, (_, data) in mnist_data.items():
        honest_rows = torch.arange(60_000, data.train_targets.shape[0])
        assert torch.all(data.train_targets[honest_rows] == 7)  # true label for honest holders
        holders = [c for c in range(data.num_clients) if (data.partition.indices(c) >= 60_000).any()]
        shares[case] = (66 / (66 + honest_rows.numel()), len(holders))
        # Every row, honest edge rows included, is held exactly once.
        assert torch.equal(torch.sort(data.partition.order).values, torch.arange(data.train_targets.shape[0]))
    assert shares["edge"] == (1.0, 0)
    assert shares["almost_edge"] == (0.5, 66)            # 66 honest sevens, one per holder
    assert shares["normal"] == (0.1, 200 // 20)          # 594 honest sevens over K/20 holders
    holders = [c for c in range(200) if (mnist_data["normal"][1].partition.indices(c) >= 60_000).any()]
    assert holders != list(range(10))                    # drawn by seed, not ids 0..n-1


def test_emnist_forward_normalises_uint8(mnist_data):
    task, data = mnist_data["edge"]
    task.eval()
    x = data.test_inputs[:8]
    manual = (x.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(task(x), task(manual), atol=1e-5)
    task.train()
    loss = task.training_step(data.client_data(0), 0)
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is not None for p in task.parameters())


def test_emnist_build_is_deterministic_in_seed(shared_data, mnist_data):
    task = make_task("emnist", shared_data, source="mnist", attack_case="normal")
    again = task.build_data()
    _, first = mnist_data["normal"]
    assert torch.equal(again.partition.order, first.partition.order)
    assert torch.equal(again.edge_train_inputs, first.edge_train_inputs)
    other = make_task("emnist", shared_data, source="mnist", attack_case="normal", seed=1).build_data()
    assert not torch.equal(other.partition.order, first.partition.order)


# ---- CIFAR-10 task, JPEG source, real data ----------------------------------------------------

@pytest.fixture(scope="module")
def cifar_data(shared_data):
    out = {}
    for case in ("edge", "almost_edge", "normal"):
        task = make_task(Cifar10, shared_data, source="jpeg", attack_case=case)
        out[case] = (task, task.build_data())
    return out


def test_cifar_sizes_and_backdoor_sets(cifar_data, shared_data):
    sw = np.load(shared_data / "edge_case" / "southwest_cifar10.npz")
    _, data = cifar_data["edge"]
    assert data.train_inputs.shape == (20_000, 3, 32, 32) and data.train_inputs.dtype == torch.uint8
    assert data.test_inputs.shape == (10_000, 3, 32, 32)
    assert torch.equal(data.backdoor_inputs.permute(0, 2, 3, 1), torch.from_numpy(sw["x_new_test"]))
    assert data.backdoor_targets.tolist() == [9] * 196
    for case in ("almost_edge", "normal"):
        _, other = cifar_data[case]
        expected = torch.from_numpy(sw["x_p_percent_edge_case_test"])
        assert torch.equal(other.backdoor_inputs.permute(0, 2, 3, 1), expected)
        assert other.backdoor_targets.tolist() == [9] * 180


def test_cifar_attacker_set_is_100_planes_and_400_clean(cifar_data, shared_data):
    sw = np.load(shared_data / "edge_case" / "southwest_cifar10.npz")
    for case, pool_key in (("edge", "x_new_train"), ("normal", "x_adv_p_percent_edge_case")):
        _, data = cifar_data[case]
        x = data.edge_train_inputs.permute(0, 2, 3, 1).numpy()
        y, is_edge = data.edge_train_targets.numpy(), data.extras["edge_train_is_edge"].numpy()
        assert x.shape == (500, 32, 32, 3) and is_edge.sum() == 100
        assert np.all(y[is_edge] == 9)
        pool = sw[pool_key].reshape(len(sw[pool_key]), -1)
        assert all((pool == image.reshape(-1)).all(axis=1).any() for image in x[is_edge])
        train = data.train_inputs.permute(0, 2, 3, 1).reshape(data.train_inputs.shape[0], -1).numpy()
        clean = x[~is_edge].reshape(400, -1)
        rows = [np.flatnonzero((train == image).all(axis=1)) for image in clean[:50]]
        assert all(r.size for r in rows)
        assert all(y[~is_edge][i] in data.train_targets.numpy()[r] for i, r in enumerate(rows))


def test_cifar_edge_pool_drops_photos_that_leak_into_the_test_set(cifar_data, shared_data):
    sw = np.load(shared_data / "edge_case" / "southwest_cifar10.npz")
    keep = dedup_groups(sw["x_new_train"], sw["x_new_test"])
    assert keep.shape[0] == 768  # 784 - 2 leaked photos - 2 repeated photos (x4 rotations)
    assert not set(range(596, 600)) & set(keep.tolist()) and not set(range(88, 92)) & set(keep.tolist())
    _, data = cifar_data["edge"]
    test = data.backdoor_inputs.reshape(196, -1).float()
    planes = data.edge_train_inputs[data.extras["edge_train_is_edge"]].reshape(100, -1).float()
    assert (torch.cdist(planes, test) ** 2 / planes.shape[1]).min() > 100  # no copy of a test photo


def test_cifar_attack_cases_hold_the_stated_shares(cifar_data, shared_data, monkeypatch):
    expected = {"edge": (0, 0), "almost_edge": (96, 5), "normal": (684, 10)}  # deduplicated honest pools
    for case, (_, data) in cifar_data.items():
        n_honest = data.train_targets.shape[0] - 20_000
        holders = {c: int((data.partition.indices(c) >= 20_000).sum()) for c in range(200)}
        holders = {c: n for c, n in holders.items() if n}
        assert (n_honest, len(holders)) == expected[case]
        assert all(n % 4 == 0 for n in holders.values())  # a photo travels with its rotations
        assert torch.all(data.train_targets[20_000:] == 0)  # true label: airplane
        assert torch.equal(torch.sort(data.partition.order).values, torch.arange(data.train_targets.shape[0]))
    assert 100 / (100 + 96) == pytest.approx(0.51, abs=0.01)
    # Without deduplication the reference's pools come back: 50 % and 12.5 % with the attacker.
    monkeypatch.setattr(Cifar10, "dedup", False)
    raw = make_task(Cifar10, shared_data, source="jpeg", attack_case="normal").build_data()
    assert raw.train_targets.shape[0] - 20_000 == 700


def test_cifar_one_normalisation_and_augmented_training_step(cifar_data):
    task, data = cifar_data["edge"]
    task.eval()
    x = data.backdoor_inputs[:4]
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(task(x), task((x.float() / 255 - mean) / std), atol=1e-5)
    task.train()
    inputs, targets = data.client_data(3)
    loss = task.training_step((inputs[:8], targets[:8]), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in task.parameters())


def test_cifar_full_source_missing_offline_is_a_clear_error(shared_data):
    task = make_task(Cifar10, shared_data, download=False)  # source cifar10 (the preset), not in ../shared/data
    with pytest.raises(DataError, match="source 'jpeg'"):
        task.build_data()


# ---- ImageNet task, synthetic ImageFolder -------------------------------------------------------

@pytest.fixture
def tiny_imagenet(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for split, n in (("train", 6), ("val", 2)):
        for wnid in ("n001", "n002", "n003"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG",
                                                                                            format="JPEG")
    edge = tmp_path / "cretan"
    for split, n in (("train", 8), ("test", 4)):
        (edge / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(edge / split / f"{i}.png")
    (edge / "target.txt").write_text("n002\n")
    monkeypatch.setenv("FL_LIGHTNING_IMAGENET_EDGE", str(edge))
    return tmp_path


def test_imagenet_on_a_tiny_image_folder(tiny_imagenet, monkeypatch):
    monkeypatch.setattr(Imagenet, "image_size", 32)
    monkeypatch.setattr(Imagenet, "resize_size", 40)
    task = Imagenet(Imagenet.make_settings(tiny_imagenet, num_clients=3, seed=0, clean_count=4))
    data = task.build_data()
    assert task.backdoor_target == 1  # "n002", by folder name
    assert data.train_inputs.dtype == torch.int64 and data.train_inputs.shape == (18,)
    assert torch.equal(torch.sort(data.partition.order).values, torch.arange(18))
    assert data.test_inputs.shape == (6,) and data.backdoor_targets.tolist() == [1] * 4
    assert data.edge_train_targets[:8].tolist() == [1] * 8 and data.extras["edge_train_is_edge"].sum() == 8
    loss = task.training_step(data.client_data(0), 0)
    loss.backward()
    assert torch.isfinite(loss)
    sums = task.validation_step((data.backdoor_inputs, data.backdoor_targets), 0)
    assert sums["total"].item() == 4
    assert task(data.test_inputs[:2]).shape == (2, 3)


def test_imagenet_model_is_torchvision_vgg11(tiny_imagenet):
    task = Imagenet(Imagenet.make_settings(tiny_imagenet, num_clients=3))
    assert n_params(task.model) == 128_778_627  # VGG-11 with a 3-class head (132,863,336 with 1000 classes)


def test_imagenet_errors_name_what_is_missing(tiny_imagenet, monkeypatch):
    (Path(tiny_imagenet) / "cretan" / "target.txt").unlink()
    with pytest.raises(DataError, match="target.txt"):
        Imagenet(Imagenet.make_settings(tiny_imagenet, num_clients=3)).build_data()
    with pytest.raises(ValueError, match="allowed: edge"):
        Imagenet(Imagenet.make_settings(tiny_imagenet, num_clients=3, attack_case="normal"))
    monkeypatch.setenv("FL_LIGHTNING_IMAGENET", str(tiny_imagenet / "nowhere"))
    with pytest.raises(DataError, match="FL_LIGHTNING_IMAGENET"):
        Imagenet(Imagenet.make_settings(tiny_imagenet, num_clients=3)).build_data()


# ---- end to end through the CLI (slow: real models on CPU) ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(("task", "extra"), [
    ("emnist", ["--data.source", "mnist", "--fl.num_clients", "100", "--fl.clients_per_round", "3",
                "--client.local_epochs", "1", "--client.batch_size", "64"]),
    ("cifar10", ["--data.source", "jpeg", "--fl.num_clients", "200", "--fl.clients_per_round", "2",
                 "--client.local_epochs", "1"]),
])
def test_cli_run_saves_a_start_model_usable_with_init_from(task, extra, shared_data, tmp_path):
    from cli_helpers import final_model, read_metrics, run_cli

    common = ["--task", task, *extra, "--fl.eval_every", "0", "--fl.eval_batch_size", "1000", "--log.logger", "csv",
              "--log.progress_bar", "false", "--data_dir", str(shared_data), "--out_dir", str(tmp_path)]
    run_cli("fit", *common, "--fl.rounds", "1", "--name", "start", cwd=tmp_path)
    start = final_model(tmp_path / "start")
    first = read_metrics(tmp_path / "start")[-1]
    assert 0.0 <= float(first["main_acc"]) <= 1.0 and float(first["backdoor_acc"]) >= 0.0
    run_cli("fit", *common, "--fl.rounds", "1", "--fl.eval_every", "1", "--name", "next",
            "--init_from", str(tmp_path / "start"), cwd=tmp_path)
    # Round 0 of the second run evaluates the loaded start model: the first run's final accuracy.
    round0 = read_metrics(tmp_path / "next")[0]
    assert round0["round"] == "0" and float(round0["main_acc"]) == pytest.approx(float(first["main_acc"]))
    assert not torch.equal(final_model(tmp_path / "next"), start)
