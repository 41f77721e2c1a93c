"""Tables and figures of runs and sweeps: `python -m fl_lightning report RUN_OR_SWEEP_DIR...`.

Reproduces the way Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated
Learning", NeurIPS 2020 (arXiv:2007.05084), show their results: main-task and target-task (backdoor)
accuracy against communication rounds, one line per attack or defense, the target-task curve
smoothed by a rolling mean over 10 rounds (`min_periods=1`, as the authors' plotting notebook does).
The Markdown table gives, per run or per group of runs with the same swept values (seeds averaged):
final main-task accuracy, final, last-10-round and best backdoor accuracy, the mean backdoor accuracy
over all rounds, the backdoor's lifespan (`lifespan`), and the rounds the smoothed backdoor curve
takes to reach 50 %.

A directory is read as a sweep when it holds `index.jsonl` (written by `sweep`), as a run when it
holds `metrics.csv`, and otherwise searched for both. Figures are drawn with matplotlib's Agg canvas
(no display, no pyplot state).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fl_lightning.config import check_int, flatten_config, raise_problems
from fl_lightning.experiments.sweep import INDEX_JSONL, read_index, short_class_name, slug

SMOOTH_WINDOW = 10
DETECTION = ("detection_tpr", "detection_fpr")
ATTACK_COLUMNS = ("num_adversaries", "attacked")  # averaged over a group's runs: > 0 where any run was attacked
THRESHOLD = 0.5
# Settings that say where or how a run ran, not what it measured: never a reason to tell runs apart.
BOOKKEEPING = ("name", "out_dir", "data_dir", "resume", "init_from", "accelerator", "devices", "num_nodes",
               "num_threads", "malloc_tuning", "log.", "fl.eval_batch_size", "fl.checkpoint_every", "data.download")


@dataclass
class RunResult:
    """One run's parameters (as swept, or its flattened config) and its per-round metrics."""

    name: str
    path: Path
    params: dict[str, Any]
    metrics: pd.DataFrame
    swept_keys: tuple[str, ...] = ()


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The evaluated rounds of `metrics.csv` (rows with a main accuracy), by round."""
    metrics = pd.read_csv(Path(run_dir) / "metrics.csv")
    metrics = metrics[metrics["main_acc"].notna()] if "main_acc" in metrics else metrics.iloc[:0]
    return metrics.sort_values("round").reset_index(drop=True)


def smooth(values: pd.Series, window: int = SMOOTH_WINDOW) -> pd.Series:
    """The authors' smoothing of the target-task curve: a rolling mean over `window` rounds, min_periods=1."""
    return values.rolling(window, min_periods=1).mean()


def rounds_to(metrics: pd.DataFrame, threshold: float = THRESHOLD, window: int = SMOOTH_WINDOW) -> int | None:
    """The first round at which the smoothed backdoor accuracy reaches `threshold`; None if it never does.

    The smoothed curve (as plotted) is used so that one lucky round right after an attack does not count.
    """
    reached = metrics["round"][smooth(metrics["backdoor_acc"], window) >= threshold]
    return int(reached.iloc[0]) if len(reached) else None


def attack_rows(metrics: pd.DataFrame) -> pd.Series | None:
    """Which rows had an attacker: `num_adversaries` > 0, else an attack callback's `attacked` mark; None: unknown."""
    for column in ("num_adversaries", "attacked"):
        if column in metrics:
            return metrics[column].fillna(0) > 0
    return None


def lifespan(metrics: pd.DataFrame, control: pd.DataFrame | None = None) -> int | None:
    """BackFed's backdoor lifespan: rounds after the last attacked round until the backdoor accuracy
    falls below half its value at that round; None if it never does within the run (or nothing was attacked).

    The last attacked round R is the last row with `num_adversaries` > 0 (else `attacked` > 0), and
    the reference value v the backdoor accuracy at R (the global model after R's aggregation; with
    `eval_every` > 1, at the first evaluated round from R on). The lifespan is r − R for the first
    evaluated round r after it with accuracy < v / 2. With a `control` (the same run without the
    attacker) the lift, backdoor_acc − the control's backdoor_acc at the same round (rounds evaluated
    in both), is used instead of the raw accuracy. A backdoor that is not there at R (v <= 0) has
    lifespan 0.
    """
    attacked = attack_rows(metrics)
    if attacked is None or not attacked.any():
        return None
    last_attack = int(metrics["round"][attacked].max())
    values = metrics[["round", "backdoor_acc"]].dropna()
    if control is not None:
        baseline = control[["round", "backdoor_acc"]].dropna().rename(columns={"backdoor_acc": "control_acc"})
        values = values.merge(baseline, on="round", how="inner")
        values = values.assign(backdoor_acc=values["backdoor_acc"] - values["control_acc"])
    values = values[values["round"] >= last_attack].sort_values("round")
    if values.empty:
        return None
    reference = float(values["backdoor_acc"].iloc[0])
    if reference <= 0:
        return 0
    later = values.iloc[1:]
    fallen = later["round"][later["backdoor_acc"] < reference / 2]
    return int(fallen.iloc[0]) - last_attack if len(fallen) else None


def summarize(metrics: pd.DataFrame, window: int = SMOOTH_WINDOW) -> dict[str, Any]:
    """The table's numbers for one run (or one averaged group curve); accuracies are fractions."""
    backdoor, after_start = metrics["backdoor_acc"], metrics["round"] > 0
    return {
        "rounds": int(metrics["round"].iloc[-1]),
        "final_main": float(metrics["main_acc"].iloc[-1]),
        "smoothed_main": float(smooth(metrics["main_acc"], window).iloc[-1]),
        "final_backdoor": float(backdoor.iloc[-1]),
        "smoothed_backdoor": float(smooth(backdoor, window).iloc[-1]),
        "best_backdoor": float(backdoor.max()),
        "mean_backdoor": float(backdoor[after_start].mean()) if after_start.any() else float(backdoor.mean()),
        "mean_main": float(metrics["main_acc"][after_start].mean()) if after_start.any() else float("nan"),
        "rounds_to_50": rounds_to(metrics, THRESHOLD, window),
        # Raw backdoor accuracy (no control run); None: never fell to half, or no round was attacked.
        "lifespan": lifespan(metrics),
        "attacked": bool(attack_rows(metrics) is not None and attack_rows(metrics).any()),
        # Detection (defenses that exclude updates): the mean over the rounds that have it (TPR: attacked rounds).
        **{c: float(metrics[c].mean()) if c in metrics and metrics[c].notna().any() else None for c in DETECTION},
    }


def find_runs(path: str | Path) -> list[RunResult]:
    """The runs under a sweep directory, a run directory, or any folder holding either."""
    path = Path(path)
    if (path / INDEX_JSONL).is_file():
        runs = []
        for row in read_index(path):
            run_dir = Path(row["run_dir"])
            run_dir = run_dir if run_dir.is_dir() else path / row["name"]  # the sweep directory was moved
            if (run_dir / "metrics.csv").is_file():
                runs.append(RunResult(row["name"], run_dir, row["params"], read_metrics(run_dir),
                                      tuple(row.get("swept_keys", ()))))
        return runs
    if (path / "metrics.csv").is_file():
        return [RunResult(path.name, path, run_config(path), read_metrics(path))]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run directory (metrics.csv) nor a sweep directory "
                                f"({INDEX_JSONL}) nor a folder holding them")
    return [run for child in sorted(p for p in path.iterdir() if p.is_dir()) for run in find_runs(child)]


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run's saved config.yaml as dotted keys (the sweeps' keys), lists kept as values."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return {}
    return flatten_config(yaml.safe_load(config_path.read_text()) or {})


def varying_keys(runs: list[RunResult]) -> list[str]:
    """The keys that tell these runs apart: the sweeps' swept keys, else config keys whose values differ."""
    swept = list(dict.fromkeys(k for run in runs for k in run.swept_keys))
    if swept and all(run.swept_keys for run in runs):
        return swept
    keys = list(dict.fromkeys(k for run in runs for k in run.params))
    keys = [k for k in keys if not any(k == b or (b.endswith(".") and k.startswith(b)) for b in BOOKKEEPING)]
    return [k for k in keys if len({json.dumps(run.params.get(k), sort_keys=True, default=str) for run in runs}) > 1]


def pretty(value: Any) -> str:
    """A value as a legend shows it: `Krum`, `NormClipping(norm_bound=1.5)`, `mode=pgd, eps=1`."""
    if isinstance(value, dict):
        if "class_path" in value:
            args = value.get("init_args") or {}
            name = short_class_name(value["class_path"])
            return f"{name}({', '.join(f'{k}={pretty(v)}' for k, v in args.items())})" if args else name
        return ", ".join(f"{k}={pretty(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(pretty(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return short_class_name(value) if isinstance(value, str) else str(value)


def short_key(key: str) -> str:
    """`callbacks.init_args` -> `callbacks`, `aggregator.init_args.norm_bound` -> `aggregator.norm_bound`."""
    return key.replace(".init_args", "")


def label(params: dict[str, Any], keys: list[str]) -> str:
    """A group's legend entry: the value alone for one key, else `key=value` pairs."""
    if len(keys) == 1:
        return pretty(params.get(keys[0]))
    return "; ".join(f"{short_key(k)}={pretty(params.get(k))}" for k in keys) or "run"


@dataclass
class Group:
    """Runs with the same values of the grouping keys; their curves are averaged by round."""

    params: dict[str, Any]
    runs: list[RunResult]

    @property
    def curve(self) -> pd.DataFrame:
        columns = ["round", "main_acc", "backdoor_acc"]
        columns += [c for c in (*DETECTION, *ATTACK_COLUMNS) if all(c in run.metrics for run in self.runs)]
        return mean_by_round([run.metrics[columns] for run in self.runs])


def mean_by_round(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Several runs' metrics (the same columns) averaged round by round: the curve of a group or a setting."""
    return pd.concat(frames).groupby("round", as_index=False).mean()


def group_runs(runs: list[RunResult], keys: list[str]) -> list[Group]:
    """Groups runs by their values of `keys`, in first-seen order."""
    groups: dict[str, Group] = {}
    for run in runs:
        params = {k: run.params.get(k) for k in keys}
        groups.setdefault(json.dumps(params, sort_keys=True, default=str), Group(params, [])).runs.append(run)
    return list(groups.values())


def percent(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}"


def markdown_table(groups: list[Group], keys: list[str], window: int = SMOOTH_WINDOW) -> str:
    """One row per group: its key values, run count and the summary numbers (accuracies in %).

    The lifespan column is `lifespan` of the group's mean curve on the raw backdoor accuracy (no
    control run: the report does not know which run is whose control), counted from the last round
    any of the group's runs was attacked; "never" when it did not fall to half, "—" without attacks.
    `read_metrics` keeps only evaluated rows, so with `--fl.eval_every` > 1 that is the last evaluated
    attacked round.
    """
    header = [*(short_key(k) for k in keys), "runs", "rounds", "final main %", "final backdoor %",
              f"backdoor %, last {window} rounds", "best backdoor %", "mean backdoor %",
              "backdoor lifespan (rounds)", f"rounds to {100 * THRESHOLD:.0f}% backdoor (smoothed)"]
    summaries = [summarize(group.curve, window) for group in groups]
    detection = any(stats[c] is not None for stats in summaries for c in DETECTION)
    if detection:
        header += ["detection TPR %", "detection FPR %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, stats in zip(groups, summaries):
        cells = [*(pretty(group.params[k]).replace("|", "/") for k in keys), str(len(group.runs)),
                 str(stats["rounds"]), percent(stats["final_main"]), percent(stats["final_backdoor"]),
                 percent(stats["smoothed_backdoor"]), percent(stats["best_backdoor"]),
                 percent(stats["mean_backdoor"]),
                 ("never" if stats["attacked"] else "—") if stats["lifespan"] is None else str(stats["lifespan"]),
                 "never" if stats["rounds_to_50"] is None else str(stats["rounds_to_50"])]
        if detection:
            cells += [percent(stats[c]) for c in DETECTION]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Line:
    """One curve of a figure: its legend entry, its metrics by round, its colour index and style."""

    label: str
    curve: pd.DataFrame
    color: int
    dashed: bool = False
    marker: str | None = None  # tells apart lines of one colour (e.g. two attacks against one defense)


def plot_groups(groups: list[Group], line_keys: list[str], path: Path, title: str,
                window: int = SMOOTH_WINDOW) -> Path:
    """The paper's figure of a report: one line per group (solid for the first 10 colours, then dashed); the
    rounds every run of the figure was attacked in are shaded."""
    lines = [Line(label(group.params, line_keys) if line_keys else "run", group.curve, i % 10, dashed=i >= 10)
             for i, group in enumerate(groups)]
    attacked = set.intersection(*(attacked_rounds(run.metrics) for group in groups for run in group.runs))
    return plot_curves(lines, path, title, window, legend_title=", ".join(short_key(k) for k in line_keys) or None,
                       shade=sorted(attacked))


def attacked_rounds(metrics: pd.DataFrame) -> set[int]:
    """The rounds an attack callback marked `attacked` in a run's metrics."""
    if "attacked" not in metrics:
        return set()
    return {int(r) for r in metrics["round"][metrics["attacked"].fillna(0) > 0]}


def plot_curves(lines: list[Line], path: Path, title: str, window: int = SMOOTH_WINDOW,
                legend_title: str | None = None, shade: list[int] = ()) -> Path:
    """Main-task accuracy (left) and target-task accuracy, smoothed over `window` rounds (right), vs rounds.

    `shade`: rounds to mark (attacked rounds), each as the span from the round before it.
    """
    # Imported here so that `fit` (same CLI) does not pay for matplotlib at start-up.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4.2 + 0.2 * ((len(lines) + 2) // 3)), layout="constrained")
    FigureCanvasAgg(figure)
    main_ax, backdoor_ax = figure.subplots(1, 2, sharex=True)
    for line in lines:
        style = {"color": f"C{line.color % 10}", "linestyle": "--" if line.dashed else "-", "linewidth": 1.6,
                 "marker": line.marker, "markersize": 5}
        main_ax.plot(line.curve["round"], 100 * line.curve["main_acc"], label=line.label, **style)
        backdoor_ax.plot(line.curve["round"], 100 * smooth(line.curve["backdoor_acc"], window), label=line.label,
                         **style)
    for ax in (main_ax, backdoor_ax):
        for i, round_idx in enumerate(shade):
            ax.axvspan(round_idx - 1, round_idx, color="tab:red", alpha=0.12, linewidth=0,
                       label="attacked round" if i == 0 and ax is main_ax else None)
    smoothed = f", {window}-round mean" if window > 1 else ""
    for ax, ylabel in ((main_ax, "Main task accuracy (%)"), (backdoor_ax, f"Target task accuracy (%){smoothed}")):
        ax.set_xlabel("Communication rounds")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    # One legend for both panels, below them, so that it never hides a curve.
    figure.legend(*main_ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(3, len(lines)),
                  fontsize=8, title=legend_title, title_fontsize=8)
    figure.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def write_report(paths: list[str | Path], out: str | Path | None = None, group_by: list[str] | None = None,
                 facet: str | None = None, window: int = SMOOTH_WINDOW) -> tuple[str, list[Path]]:
    """Builds the table and figures of the runs under `paths`; the library form of `report`.

    Returns:
        The Markdown report and the PNG files written.
    """
    runs = [run for path in paths for run in find_runs(path)]
    runs = [run for run in runs if "backdoor_acc" in run.metrics and len(run.metrics)]
    if not runs:
        raise FileNotFoundError(f"no runs with main and backdoor accuracy under {', '.join(map(str, paths))}")
    keys = group_by if group_by is not None else [k for k in varying_keys(runs) if k != "seed"]
    groups = group_runs(runs, keys)
    out = Path(out) if out is not None else (Path(paths[0]) / "report" if len(paths) == 1 else Path("report"))
    title = " + ".join(dict.fromkeys(Path(p).resolve().name for p in paths))

    # One figure per value of the facet key (the paper: one panel per attack, one line per defense).
    if facet is None and len(keys) >= 2:
        facet = keys[0]
    line_keys = [k for k in keys if k != facet]
    panels: dict[str, list[Group]] = {}
    for group in groups:
        panels.setdefault(slug(group.params.get(facet))[:60] if facet else "", []).append(group)
    figures = []
    for value, members in panels.items():
        name = f"accuracy_{value}.png" if facet else "accuracy.png"
        caption = f"{title}: {short_key(facet)} = {pretty(members[0].params.get(facet))}" if facet else title
        figures.append(plot_groups(members, line_keys, out / name, caption, window))

    text = (f"# Report: {title}\n\n{len(runs)} run(s) in {len(groups)} group(s)"
            + (f", grouped by {', '.join(keys)}" if keys else "") + ". Accuracies in %; the backdoor (target-task)"
            f" curve is smoothed by a {window}-round rolling mean.\n\n" + markdown_table(groups, keys, window) + "\n\n"
            + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    return text, figures


def report(paths: list[str], *, out: str | None = None, group_by: list[str] | None = None, facet: str | None = None,
           window: int = SMOOTH_WINDOW) -> None:
    """Markdown table and PNG figures (main-task and smoothed target-task accuracy vs rounds) of runs and sweeps.

    Args:
        paths: Run directories, sweep directories (with index.jsonl), or folders holding them.
        out: Where report.md and the PNGs go; None: `<path>/report` for one path, else `./report`.
        group_by: Keys whose values make a table row and a line (runs alike in them are averaged);
            None: the swept keys (or the config keys that differ), except `seed`.
        facet: Key with one figure per value (None: the first grouping key when there are several).
        window: Rounds of the rolling mean over the target-task curve (the paper's 10).
    """
    raise_problems([check_int("--window", window, minimum=1)])
    text, figures = write_report(paths, out, group_by, facet, window)
    print(text)
    for figure in figures:
        print(f"figure: {figure}", file=sys.stderr)
