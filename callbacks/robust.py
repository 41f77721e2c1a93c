"""Old home of the robust rules, kept as an alias.

`Krum`, `MultiKrum`, `GeometricMedian`, `TrimmedMean` and `CoordinateMedian` now live in
`krum.py`, `rfa.py` and `coordinatewise.py`. This module exists so that `config.yaml` files
written before that split (`class_path: fl_lightning.callbacks.robust.Krum`) still load; new
configs name the classes as `fl_lightning.callbacks.<Name>`.
"""

from fl_lightning.callbacks.coordinatewise import CoordinateMedian, TrimmedMean
from fl_lightning.callbacks.krum import Krum, MultiKrum
from fl_lightning.callbacks.rfa import GeometricMedian

__all__ = ["CoordinateMedian", "GeometricMedian", "Krum", "MultiKrum", "TrimmedMean"]
