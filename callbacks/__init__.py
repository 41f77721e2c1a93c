"""Attacks (FL callbacks) and defenses (aggregators), importable by class name on the CLI.

`--aggregator NAME` and `--callbacks NAME` resolve any class exported here.
"""

from __future__ import annotations

from fl_lightning.aggregation import Aggregator, FedAvg
from fl_lightning.callbacks.bulyan import Bulyan
from fl_lightning.callbacks.clipping import NormClipping, WeakDP
from fl_lightning.callbacks.coordinatewise import CoordinateMedian, TrimmedMean
from fl_lightning.callbacks.crfl import CRFL
from fl_lightning.callbacks.deepsight import DeepSight
from fl_lightning.callbacks.edge_case import EdgeCaseAttack
from fl_lightning.callbacks.flame import FLAME
from fl_lightning.callbacks.fldetector import FLDetector
from fl_lightning.callbacks.fltrust import FLTrust
from fl_lightning.callbacks.foolsgold import FoolsGold
from fl_lightning.callbacks.krum import Krum, MultiKrum
from fl_lightning.callbacks.local_dp import LocalDP
from fl_lightning.callbacks.rfa import GeometricMedian
from fl_lightning.callbacks.robust_lr import RobustLR
from fl_lightning.hooks import FLCallback

__all__ = [
    "Aggregator",
    "Bulyan",
    "CoordinateMedian",
    "CRFL",
    "DeepSight",
    "EdgeCaseAttack",
    "FedAvg",
    "FLAME",
    "FLCallback",
    "FLDetector",
    "FLTrust",
    "FoolsGold",
    "GeometricMedian",
    "Krum",
    "LocalDP",
    "MultiKrum",
    "NormClipping",
    "RobustLR",
    "TrimmedMean",
    "WeakDP",
]
