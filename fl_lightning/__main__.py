"""Command line: `python -m fl_lightning fit|validate ...` (jsonargparse, LightningCLI style).

    python -m fl_lightning fit --task sentiment140                 # the paper's preset
    python -m fl_lightning fit --task toy --fl.rounds=3 --aggregator Krum --aggregator.num_adversaries 1
    python -m fl_lightning fit --task toy --print_config > run.yaml
    python -m fl_lightning fit --config run.yaml --seed 1
    python -m fl_lightning fit --resume runs/toy-20261125-120000      # continue from the last checkpoint
    python -m fl_lightning validate --checkpoint runs/toy-20261125-120000
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from jsonargparse import CLI

import fl_lightning.callbacks as components
from fl_lightning.aggregation import Aggregator
from fl_lightning.claims import claims
from fl_lightning.config import ConfigError
from fl_lightning.data import DataError
from fl_lightning.hooks import FLCallback
from fl_lightning.orchestrator import fit, validate
from fl_lightning.report import report
from fl_lightning.sweep import sweep
from fl_lightning.tasks import TASKS

COMMANDS = {"fit": fit, "validate": validate, "sweep": sweep, "report": report, "claims": claims}
# Shorthands of the sweep, report and claims commands that jsonargparse signatures cannot express:
# leading bare words fill an option, list options repeat, boolean flags stand alone
# (`sweep X.yaml --set a=1 --set b=2 --dry_run`, `report DIR1 DIR2`, `claims --quick`).
POSITIONALS = {"sweep": "file", "report": "paths"}
REPEATABLE = {"sweep": ("--set",), "report": ("--paths", "--group_by")}
FLAGS = {"sweep": ("--dry_run",), "claims": ("--quick",)}


def main(argv: list[str] | None = None) -> None:
    """Runs the CLI; a bad setting ends with a one-paragraph error and exit status 2, no traceback."""
    argv = with_shorthands(with_resume_config(list(sys.argv[1:] if argv is None else argv)))
    try:
        check_names(argv)
        CLI(COMMANDS, args=argv, as_positional=False, prog="python -m fl_lightning",
            description=__doc__.split("\n\n")[0])
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def with_resume_config(argv: list[str]) -> list[str]:
    """`fit --resume DIR` loads `DIR/config.yaml` first, so a resumed run needs no other arguments.

    Later arguments still override it. An explicit `--config` is left alone.
    """
    if not argv or argv[0] != "fit" or any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--resume" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--resume=") else None)
        if value and (Path(value) / "config.yaml").is_file():
            return ["fit", "--config", str(Path(value) / "config.yaml"), *argv[1:]]
    return argv


def with_shorthands(argv: list[str]) -> list[str]:
    """Rewrites the shorthands of `POSITIONALS`, `REPEATABLE` and `FLAGS` into jsonargparse's forms.

    `sweep F` -> `sweep --file F`; `report A B` -> `report --paths+ A --paths+ B`; `--set X` -> `--set+ X`;
    a bare `--quick` -> `--quick=true`. Only the words before the first option are positional, so option
    values are never mistaken for them.
    """
    if not argv or argv[0] not in (*POSITIONALS, *FLAGS):
        return argv
    command, rest = argv[0], list(argv[1:])
    repeatable, flags, out = REPEATABLE.get(command, ()), FLAGS.get(command, ()), [argv[0]]
    while command in POSITIONALS and rest and not rest[0].startswith("-"):
        option = f"--{POSITIONALS[command]}"
        out += [f"{option}+" if option in repeatable else option, rest.pop(0)]
    for i, arg in enumerate(rest):
        name, sep, value = arg.partition("=")
        following = rest[i + 1].lower() if i + 1 < len(rest) else ""
        if arg in flags and following not in ("true", "false"):
            out.append(f"{arg}=true")
        else:
            out.append(f"{name}+{sep}{value}" if name in repeatable else arg)
    return out


def registered(base: type) -> list[str]:
    """Names of the concrete `base` subclasses exported by `fl_lightning.callbacks`."""
    return sorted(name for name in components.__all__ if inspect.isclass(cls := getattr(components, name))
                  and issubclass(cls, base) and cls is not base and not inspect.isabstract(cls))


def check_names(argv: list[str]) -> None:
    """Rejects an unknown bare task, aggregator or callback name with the list of valid ones.

    jsonargparse would reject them too, but its message does not say what is allowed. Dotted class
    paths (your own classes) are left to jsonargparse.
    """
    choices = {"--task": sorted(TASKS), "--aggregator": registered(Aggregator), "--callbacks": registered(FLCallback),
               "--callbacks+": registered(FLCallback)}
    for i, arg in enumerate(argv):
        option, _, value = arg.partition("=")
        if option in choices and not value and i + 1 < len(argv):
            value = argv[i + 1]
        if option in choices and value.isidentifier() and value not in choices[option]:
            kind = option.strip("-+").rstrip("s")
            raise ConfigError(f"unknown {kind} {value!r} for {option.rstrip('+')}; valid: {', '.join(choices[option])}")


if __name__ == "__main__":
    main()
