"""Run outputs: W&B offline without credentials, metrics.csv on resume, atomic checkpoints."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import read_metrics, run_cli

from fl_lightning.checkpoint import load_checkpoint, save_checkpoint
from fl_lightning.loggers import MetricsCSV, has_wandb_credentials
from fl_lightning.metrics import wandb_key


def test_wandb_offline_without_credentials_never_prompts(tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": None, "WANDB_MODE": None, "NETRC": str(tmp_path / "none")}
    proc = run_cli("fit", "--task", "toy", "--fl.rounds", "2", "--name", "w", "--log.progress_bar", "false",
                   cwd=tmp_path, env=env, timeout=240)
    assert "wandb sync" in proc.stderr
    run_dir = tmp_path / "runs" / "w"
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert len(read_metrics(run_dir)) == 3


def test_credentials_from_netrc(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not has_wandb_credentials()
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc_file.chmod(0o600)
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_wandb_credentials()


def test_wandb_keys_are_grouped():
    assert [wandb_key(k) for k in ("main_acc", "backdoor_acc", "train_loss_adv", "update_norm_benign", "seconds",
                                   "adversary_weight")] == \
        ["val/main_acc", "val/backdoor_acc", "train/loss_adv", "update/norm_benign", "time/seconds",
         "agg/adversary_weight"]


def test_metrics_csv_drops_rows_after_the_resumed_round(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsCSV(path)
    for round_idx in range(5):
        log.append({"round": round_idx, "main_acc": round_idx / 10})
    resumed = MetricsCSV(path, resume_round=2)
    resumed.append({"round": 3, "main_acc": 0.9, "extra": 1.0})
    rows = read_metrics(tmp_path)
    assert [(r["round"], r["main_acc"]) for r in rows] == [("0", "0.0"), ("1", "0.1"), ("2", "0.2"), ("3", "0.9")]
    assert rows[3]["extra"] == "1.0" and rows[0]["extra"] == ""


def test_checkpoint_round_trip_and_atomicity(tmp_path):
    params = torch.randn(1000)
    path = save_checkpoint(tmp_path / "checkpoint.safetensors", params, {"round_idx": 3, "callbacks": [{"a": 1}]})
    loaded, state = load_checkpoint(path)
    assert torch.equal(loaded, params) and state == {"round_idx": 3, "callbacks": [{"a": 1}]}
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed into place


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an fl_lightning checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_run_summary_says_before_and_after_the_attacks():
    from fl_lightning.metrics import summary_lines

    history = [{"round": 0, "main_acc": 0.1, "backdoor_acc": 0.0, "seconds": 0.0}]
    history += [{"round": r, "main_acc": 0.9 + r / 100, "backdoor_acc": r / 10, "attacked": float(r >= 3)}
                for r in range(1, 6)]
    assert summary_lines(history) == ["round 0 (first measured): main 10.0 %, backdoor 0.0 %",
                                      "round 2 (before the first attack): main 92.0 %, backdoor 20.0 %",
                                      "round 5 (after 3 attacked rounds): main 95.0 %, backdoor 50.0 %"]
    clean = [{**row, "attacked": 0.0} for row in history]
    assert summary_lines(clean)[-1] == "round 5 (last): main 95.0 %, backdoor 50.0 %"
    assert summary_lines([{"round": 1, "main_acc": None}]) == []


def test_detection_rates_and_norm_quantile_by_hand():
    from fl_lightning.aggregation import Aggregate
    from fl_lightning.metrics import norm_quantile, round_metrics
    from fl_lightning.types import RoundUpdates

    # Norms 1, 2, 3, 4, 5; the attackers are rows 1 (norm 2) and 4 (norm 5).
    deltas = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    adv = torch.tensor([False, True, False, False, True])
    updates = RoundUpdates(torch.arange(5), deltas, torch.ones(5), torch.zeros(5), adv, [{}] * 5)
    # A Krum-like pick of row 0: rows 1..4 get zero weight, so they are flagged.
    picked = Aggregate(update=deltas[0], client_weights=torch.tensor([1.0, 0, 0, 0, 0]))
    metrics = round_metrics(updates, picked, num_rejected=0)
    assert metrics["detection_tpr"] == 1.0 and metrics["detection_fpr"] == pytest.approx(2 / 3)
    # Norm 2 is above 1 of the 3 honest norms (1, 3, 4), norm 5 above all 3: mean (1/3 + 1) / 2.
    assert metrics["adversary_norm_quantile"] == pytest.approx(2 / 3)
    assert norm_quantile(torch.tensor([3.0]), torch.tensor([1.0, 3.0, 4.0])) == pytest.approx(0.5)  # a tie: half
    # An explicit mask wins; a rule with no weights and no mask reports no detection.
    marked = Aggregate(update=deltas[0], client_weights=None, flagged=adv.clone())
    assert round_metrics(updates, marked, 0)["detection_fpr"] == 0.0
    assert "detection_tpr" not in round_metrics(updates, Aggregate(update=deltas[0], client_weights=None), 0)
    fedavg_like = Aggregate(update=deltas[0], client_weights=torch.ones(5) / 5)  # excludes none: no detection
    assert "detection_tpr" not in round_metrics(updates, fedavg_like, 0)
