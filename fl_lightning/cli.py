"""The parsers behind `python -m fl_lightning`, and `check_fit_args`: a `fit` command line checked without running it.

Each command's parser is built by jsonargparse from the command's typed signature; what a signature
cannot express is declared as the plain argparse argument it is (`command_parser`'s `forms`), so the
parser sees argv as the user typed it. Before parsing, `check_names` reads argv for a clearer error
than jsonargparse's, and `with_resume_config` adds the one thing a signature cannot say: `fit --resume
DIR` loads `DIR/config.yaml`.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import docstring_parser
from jsonargparse import ActionConfigFile, ArgumentParser

import fl_lightning.callbacks as components
from fl_lightning import orchestrator
from fl_lightning.aggregation import Aggregator
from fl_lightning.config import ComponentError, ConfigError
from fl_lightning.hooks import FLCallback
from fl_lightning.tasks import TASKS

# An argparse form for one parameter: its option strings (or positional name) and add_argument keywords.
Form = tuple[tuple[str, ...], dict[str, Any]]


def command_parser(function: Callable, forms: dict[str, Form] | None = None) -> ArgumentParser:
    """The parser of one command: `function`'s signature, with `--config`, as jsonargparse's CLI builds it.

    Args:
        function: The command; a required parameter that is not keyword-only is a positional.
        forms: Parameters declared as plain argparse arguments in place of their signature form
            (jsonargparse derives no repeatable option, bare boolean flag or several-valued
            positional from a type); the help still comes from the function's docstring.
    """
    forms = forms or {}
    description = inspect.getdoc(function).split("\nArgs:")[0].strip()  # the text before the arguments
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file.")
    parser.add_function_arguments(function, as_group=False, as_positional=True, sub_configs=True, skip=set(forms))
    docs = {param.arg_name: param.description for param in docstring_parser.parse(function.__doc__ or "").params}
    defaults = inspect.signature(function).parameters
    for name, (flags, kwargs) in forms.items():
        if flags[0].startswith("-"):
            kwargs = {"dest": name, "default": defaults[name].default, **kwargs}
        parser.add_argument(*flags, help=docs.get(name), **kwargs)
    return parser


@cache
def fit_parser() -> ArgumentParser:
    """The parser of `fit`, built once per process as `python -m fl_lightning` builds its `fit` command."""
    return command_parser(orchestrator.fit)


def check_fit_args(args: list[str], settings: bool = True) -> None:
    """Checks `python -m fl_lightning fit ARGS` without running it: parse, build its classes, check its settings.

    Nothing is written and no data is read. Used by `sweep` and `claims` on every run before the first starts.

    Args:
        args: The arguments after `fit`.
        settings: Also check the resolved settings; False: parse and build only, for a run whose
            `--init_from` model an earlier run has yet to write.

    Raises:
        ConfigError: One line naming the option and what is allowed.
    """
    args = with_resume_config(["fit", *args])[1:]
    check_names(args)
    parser = fit_parser()
    parser.exit_on_error = False  # an ArgumentError instead of usage on stderr and exit
    try:
        kwargs = parser.instantiate(parser.parse_args(args))
    except (argparse.ArgumentError, ValueError) as err:
        raise ConfigError(parse_error_line(err, args)) from None
    finally:
        parser.exit_on_error = True
    kwargs.pop("config", None)
    if settings:
        orchestrator.check_fit(**kwargs)  # every pre-launch check of `fit`, without side effects


def parse_error_line(err: BaseException, argv: list[str]) -> str:
    """One line for an error jsonargparse raised while parsing `argv` or building its classes.

    A component's own check (`ComponentError`, wrapped by jsonargparse) is named by its option:
    `--callbacks.eps must be > 0, got -1 (EdgeCaseAttack)`; any other message goes through `one_line`.
    """
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ComponentError):
        own_name = f"{cause.component} {cause.argument}"
        option = f"--{component_prefix(cause.component, argv)}.{cause.argument}"
        return f"{str(cause).replace(own_name, option, 1)} ({cause.component})"
    if cause is not None:
        return one_line(str(cause))
    line = one_line(str(err))
    nested = re.match(r"--([\w.]+)=NestedArg\(key='([^']+)', val='([^']*)'\): Option '[^']+' is not accepted", line)
    if nested:
        return f"--{nested[1]}.{nested[2]}={nested[3]}: not an argument of the chosen class (see --help)"
    if required := re.search(r"arguments are required: (.+)$", str(err)):  # `fit.task` -> `--task`
        names = [f"--{name.strip().split('.', 1)[-1]}" for name in required.group(1).split(",")]
        return f"{', '.join(names)}: required"
    return line


def component_prefix(class_name: str, argv: list[str]) -> str:
    """The option a component was given under: `aggregator.inner` for `--aggregator.inner TrimmedMean`.

    Read from argv (`--opt NAME`, `--opt=NAME`, `--opt+=NAME`, a dotted class path ending in NAME);
    a component from a config file falls back to its kind: `aggregator` or `callbacks`.
    """
    for i, arg in enumerate(argv):
        option, sep, value = arg.partition("=")
        if not sep and i + 1 < len(argv):
            value = argv[i + 1]
        if option.startswith("--") and value.split(".")[-1] == class_name:
            return option[2:].rstrip("+")
    component = getattr(components, class_name, None)
    return "aggregator" if inspect.isclass(component) and issubclass(component, Aggregator) else "callbacks"


def one_line(message: str) -> str:
    """jsonargparse's parse error (`Parser key "fl.rounds":` then an indented tree of reasons) on one line.

    `--fl.rounds=abc: expected int`, `--callbacks.mode=nope: expected one of 'blackbox', 'pgd'`; a
    message of another shape comes back with its lines joined.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    values = re.findall(r"(?:Got|Given) value: (.*)$", message, flags=re.MULTILINE)
    if not keys or not values:
        return "; ".join(line.strip() for line in message.splitlines() if line.strip())
    expected, reasons = [], []
    for line in (line.strip().removeprefix("- ") for line in message.splitlines()):
        if match := re.match(r"Expected a (.+?)(?:\. Got value: .*)?$", line):
            kind = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", match.group(1))
            kind = re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", kind)
            if kind != "NoneType" and not kind.startswith("path but"):
                expected.append(kind)
        elif line and not re.match(r"(Parser key|Does not validate|Subtypes:|Errors:|Given value|Problem with)", line):
            reasons.append(line)
    what = "; ".join(dict.fromkeys(reasons or [f"expected {' or '.join(dict.fromkeys(expected))}"]))
    return f"--{'.'.join(keys)}={values[0]}: {what}"


def with_resume_config(argv: list[str]) -> list[str]:
    """`fit --resume DIR` loads `DIR/config.yaml` first, so a resumed run needs no other arguments.

    The one rewrite left: jsonargparse cannot take a config file's path from another option, and
    `--task` (required) comes from that file. `--config DIR/config.yaml` goes right after `fit`, so
    later arguments still override it; an explicit `--config` is left alone.
    """
    if not argv or argv[0] != "fit" or any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--resume" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--resume=") else None)
        if value:
            if not (Path(value) / "config.yaml").is_file():
                missing = "does not exist" if not Path(value).exists() else "holds no config.yaml (not a run directory)"
                raise ConfigError(f"--resume={value}: {missing}; give the directory of a run that wrote a checkpoint")
            return ["fit", "--config", str(Path(value) / "config.yaml"), *argv[1:]]
    return argv
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--resume" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--resume=") else None)
        if value and (Path(value) / "config.yaml").is_file():
            return ["fit", "--config", str(Path(value) / "config.yaml"), *argv[1:]]
    return argv


def registered(base: type) -> list[str]:
    """Names of the concrete `base` subclasses exported by `fl_lightning.callbacks`."""
    return sorted(name for name in components.__all__ if inspect.isclass(cls := getattr(components, name))
                  and issubclass(cls, base) and cls is not base and not inspect.isabstract(cls))


def check_names(argv: list[str]) -> None:
    """Rejects an unknown bare task, aggregator or callback name with the list of valid ones.

    It reads argv and changes nothing: jsonargparse rejects these names too, but its message does
    not say what is allowed. Dotted class paths (your own classes) are left to jsonargparse.
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
