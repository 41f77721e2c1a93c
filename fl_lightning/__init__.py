"""fl_lightning: federated learning under edge-case backdoor attacks, on Lightning Fabric.

Reproduces Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated Learning",
NeurIPS 2020 (arXiv:2007.05084). Reading order: `__main__` (the CLI), `orchestrator.run_rounds`
(one round), `client.train_client`, `aggregation`, `hooks`, then `tasks/` and `callbacks/`.
"""

from fl_lightning.aggregation import Aggregate, Aggregator, FedAvg
from fl_lightning.hooks import FLCallback

__version__ = "0.1.0"

__all__ = ["Aggregate", "Aggregator", "FLCallback", "FedAvg", "__version__"]
