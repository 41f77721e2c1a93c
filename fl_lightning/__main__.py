"""Command line: `python -m fl_lightning fit|validate|sweep|report|claims|defenses ...` (jsonargparse).

    python -m fl_lightning fit --task sentiment140                 # the paper's preset
    python -m fl_lightning fit --task toy --fl.rounds=3 --aggregator Krum --aggregator.num_adversaries 1
    python -m fl_lightning fit --task toy --print_config > run.yaml
    python -m fl_lightning fit --config run.yaml --seed 1
    python -m fl_lightning fit --resume runs/toy-20261125-120000      # continue from the last checkpoint
    python -m fl_lightning validate --checkpoint runs/toy-20261125-120000
    python -m fl_lightning sweep sweeps/toy_smoke.yaml --set fl.rounds=1 --set aggregator=Krum --dry_run
    python -m fl_lightning report runs/toy_smoke runs/other_sweep --group_by aggregator
    python -m fl_lightning claims --quick
    python -m fl_lightning defenses                                # edge-case attacks vs. the modern defenses
"""

from __future__ import annotations

import argparse
import inspect
import sys

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from fl_lightning.cli import Form, check_names, command_parser, parse_error_line, with_resume_config
from fl_lightning.config import ConfigError
from fl_lightning.data import DataError
from fl_lightning.experiments.claims import claims
from fl_lightning.experiments.defenses import defenses
from fl_lightning.experiments.report import report
from fl_lightning.experiments.sweep import sweep
from fl_lightning.orchestrator import fit, validate

COMMANDS = {"fit": fit, "validate": validate, "sweep": sweep, "report": report, "claims": claims,
            "defenses": defenses}
# `--flag` alone is true; `--flag true|false` still works (jsonargparse's bool options need the value).
FLAG: dict = {"action": ActionYesNo, "nargs": "?"}
# What the harness's signatures cannot tell jsonargparse, declared as argparse arguments instead:
# an option given once per value (`--set a=1 --set b=2`), a positional taking several values
# (`report DIR1 DIR2`) and bare flags (`--dry_run`, `--quick`). `sweep FILE` is a plain positional.
FORMS: dict[str, dict[str, Form]] = {
    "sweep": {"overrides": (("--set",), {"action": "append", "metavar": "KEY=VALUE"}),
              "dry_run": (("--dry_run",), FLAG)},
    "report": {"paths": (("paths",), {"nargs": "+"}), "group_by": (("--group_by",), {"action": "append"})},
    "claims": {"quick": (("--quick",), FLAG)},
}


def main(argv: list[str] | None = None) -> None:
    """Runs the CLI; a bad setting ends with one line `error: ...` and exit status 2, no traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = with_resume_config(argv)
        check_names(argv)
        parser = ArgumentParser(prog="python -m fl_lightning", description=__doc__.split("\n\n")[0],
                                exit_on_error=False)
        parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
        subcommands = parser.add_subcommands(required=True)
        for name, function in COMMANDS.items():
            command = command_parser(function, FORMS.get(name))
            subcommands.add_subcommand(name, command, help=inspect.getdoc(function).split("\n\n")[0])
        try:
            init = parser.instantiate(parser.parse_args(argv))
        except (argparse.ArgumentError, ValueError) as err:  # a bad value, or a component's own check
            raise ConfigError(parse_error_line(err, argv)) from None
        name = init.pop("subcommand")
        kwargs = init[name]
        kwargs.pop("config", None)
        COMMANDS[name](**kwargs)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the message
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
