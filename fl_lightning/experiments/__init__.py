"""The research harness: the paper's experiments run through `fit`, and their results read back.

* `sweep`: runs a W&B sweep file locally, one `fit` subprocess per configuration
  (`python -m fl_lightning sweep sweeps/X.yaml`);
* `report`: tables and figures of runs and sweeps (`python -m fl_lightning report DIR...`);
* `claims`: the four-claims check of the paper, built from the sweep files (`python -m fl_lightning claims`).

The harness drives `fit` (through its command line, as a user would), never the reverse: the engine
(`fl_lightning` outside this package) never imports it. Only the entry point, `fl_lightning.__main__`,
imports it, to offer these commands beside `fit` and `validate`.
"""
