"""Turn training runs into a comparison: a Markdown table and the papers' plots.

    python -m horovod_leader.report runs/lsgd runs/dp runs/easgd --target 0.95 --out runs/report

For each run folder (written by ``horovod_leader.train``): final and best test accuracy, the
training time to reach ``--target`` accuracy, steps per second of training, and bytes
communicated per step per worker. Plots: test accuracy against training time (linear, in
percent: the figure read at a glance), test error against training time (the papers' figure,
on a log axis so that one run that fails does not flatten the others), the global leader's
identity over time, and communication volume over time.

Which model a run's curve measures (the ``curve of`` column; the accuracy columns, the time
to target and the plotted curve all use that one model): the **centre**, for every method,
as the authors report it (LSGD's authors test the workers' average, not the leader):

* the workers' average with batch-norm statistics re-estimated (LSGD, GRAWA, local SGD,
  data-parallel SGD); EASGD's centre variable; DiLoCo's outer parameters;
* asynchronous runs measure the same centre between their rounds on rank 0 alone: EASGD's
  replica, the one-sided EASGD's shards read one-sidedly, or a snapshot of the average taken
  at a round (``DistributedWrapper.request_centre``).

LSGD's global leader keeps a column of its own (``final leader``), and multi-leader runs
list each group's centre in ``summary.json``. ``trained (s)`` is the training time of the
last record; a run that trained more than 5% past its ``--time-budget`` is flagged there, so
that its accuracy is not read against runs that kept theirs.

Bytes: ``comm_bytes`` (collective payload) plus, for the one-sided EASGD, which joins no
collective, its window traffic ``one_sided_bytes``.

Time is the training clock (``train_seconds``): wall-clock time with evaluation and
checkpoint writes excluded, as the authors measure it. ``wall_seconds`` (everything
included) is kept in ``summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional


def load_run(folder: Path) -> Dict:
    config_path, metrics_path = folder / "config.json", folder / "metrics.jsonl"
    if not metrics_path.exists():
        raise ValueError(f"{folder} has no metrics.jsonl: is it an output folder of horovod_leader.train?")
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_path} is empty")
    from horovod_leader.training.metrics import METRICS

    return {"name": folder.name, "label": method_label(config, folder.name), "config": config,
            "records": records, "model": curve_of(config, records),
            "metric": METRICS[config.get("metric", "accuracy")]}


def method_label(config: Dict, fallback: str) -> str:
    """``lsgd``, ``easgd one-sided async``, ``diloco adamw``, ``lsgd int8``, ..."""
    parts = [config.get("algo", fallback)]
    if config.get("easgd_variant") == "one-sided":
        parts.append("one-sided")
    if config.get("asynchronous"):
        parts.append("async")
    if config.get("inner_optimizer", "sgd") != "sgd":
        parts.append(config["inner_optimizer"])
    if config.get("compression", "none") != "none":
        parts.append(config["compression"])
    return " ".join(parts)


def curve_of(config: Dict, records: List[Dict]) -> str:
    """Which model the run's accuracy curve measures: the centre (see the module's docstring)."""
    from horovod_leader.registry import METHODS

    spec = METHODS.get(config.get("algo"))
    return spec.centre if spec is not None else "centre (workers' average)"


def accuracy_of(record: Dict, model: Optional[str] = None, metric=None) -> Optional[float]:
    """The centre's figure in one record, or None: its accuracy, or the run's ``metric``
    (``training.metrics``: bits per byte for the language model). ``model`` is ``curve_of``'s label."""
    key = "centre_accuracy" if metric is None else metric.keys["centre"]
    return None if record.get(key) is None else float(record[key])


OVER_BUDGET = 1.05  # a run that trained more than 5% past its budget is flagged


def budget_cell(run: Dict) -> str:
    """The training seconds of the last record, flagged when more than 5% past the budget."""
    last = run["records"][-1]
    budget = last.get("time_budget", run["config"].get("time_budget"))
    seconds = last["train_seconds"]
    if budget and seconds > OVER_BUDGET * budget:
        return f"{seconds:.1f} (OVER budget {budget:g} s by {100 * (seconds / budget - 1):.0f}%)"
    return f"{seconds:.1f}"


def curve(run: Dict) -> List:
    """(training seconds, the run's metric) of its centre, in order."""
    return [(r["train_seconds"], a) for r in run["records"]
            if (a := accuracy_of(r, run["model"], run.get("metric"))) is not None]


def bytes_of(record: Dict) -> float:
    """Bytes sent by rank 0's worker so far: collectives, plus one-sided window traffic."""
    total = 0.0
    for key in ("comm_bytes", "one_sided_bytes"):
        value = record.get(key, 0)
        total += float(value[0] if isinstance(value, list) else value)
    return total




def summarise(run: Dict, target: float) -> Dict:
    records = run["records"]
    accs = curve(run)
    metric = run["metric"]
    last = records[-1]
    reached = next((t for t, a in accs if metric.better(a, target)), None)
    steps = max(last["step"], 1)
    best = max if metric.higher_is_better else min
    return {"run": run["name"], "method": run["label"], "curve_of": run["model"], "metric": metric.name,
            "final_leader_accuracy": last.get(metric.keys["leader"]), "trained": budget_cell(run),
            "final_accuracy": accs[-1][1] if accs else None,
            "best_accuracy": best(a for _, a in accs) if accs else None, "time_to_target_s": reached,
            "steps_per_s": last["step"] / last["train_seconds"] if last["train_seconds"] > 0 else None,
            "bytes_per_step": bytes_of(last) / steps, "steps": last["step"],
            "train_seconds": last["train_seconds"], "wall_seconds": last["wall_seconds"],
            "final_group_centre_accuracies": last.get(metric.keys["groups"]),
            **{key: last.get(key) for key in FLATNESS_KEYS}}


# Written by ``train --flatness`` into the final record (see ``horovod_leader.flatness``).
FLATNESS_KEYS = ("hessian_trace", "hessian_top_eigenvalue", "leader_hessian_trace", "leader_hessian_top_eigenvalue")


def flatness_cell(summary: Dict, key: str) -> str:
    """The centre's figure, and LSGD's leader's in brackets; '-' when not measured."""
    centre, leader = summary.get(key), summary.get("leader_" + key)
    text = "-" if centre is None else f"{centre:.4g}"
    return text if leader is None else f"{text} (leader {leader:.4g})"


def table(summaries: List[Dict], target: float) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    what = "bits/byte" if summaries and summaries[0].get("metric") == "bits_per_byte" else "acc."
    lines = [f"| run | method | curve of | final {what} | best {what} | training time to {target:.2f} (s) | "
             "final leader | trained (s) | steps/s | bytes/step/worker | Hessian trace | top eigenvalue |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['run']} | {s['method']} | {s['curve_of']} | {fmt(s['final_accuracy'], '.4f')} | "
                     f"{fmt(s['best_accuracy'], '.4f')} | {fmt(s['time_to_target_s'], '.1f')} | "
                     f"{fmt(s['final_leader_accuracy'], '.4f')} | {s['trained']} | "
                     f"{fmt(s['steps_per_s'], '.1f')} | {fmt(s['bytes_per_step'], ',.0f')} | "
                     f"{flatness_cell(s, 'hessian_trace')} | {flatness_cell(s, 'hessian_top_eigenvalue')} |")
    return "\n".join(lines)


ERROR_FLOOR = 0.01  # percent: a perfect score is drawn here, since a log axis has no 0


def error_figure(runs: List[Dict]):
    """Test error (%) of each run's model against training time, on a log axis; the legend
    names the model each curve measures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    accuracy = all(run.get("metric") is None or run["metric"].name == "accuracy" for run in runs)
    for run in runs:
        pts = curve(run)
        ys = [max(100 * (1.0 - a), ERROR_FLOOR) for _, a in pts] if accuracy else [a for _, a in pts]
        ax.plot([t for t, _ in pts], ys, marker=".", label=f"{run['name']} ({run['label']}: {run['model']})")
    if accuracy:
        ax.set_yscale("log")
    return fig


def accuracy_figure(runs: List[Dict]):
    """Test accuracy (%) of each run's centre against training time, on a linear axis (bits per
    byte for a language model): the figure read at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    accuracy = all(run.get("metric") is None or run["metric"].name == "accuracy" for run in runs)
    for run in runs:
        pts = curve(run)
        ax.plot([t for t, _ in pts], [100 * a if accuracy else a for _, a in pts], marker="o", markersize=3,
                label=run["name"])
    return fig, accuracy


def plots(runs: List[Dict], out: Path, title: Optional[str] = None) -> List[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def finish(fig, ax, name: str, ylabel: str, title: str, legend: bool = True) -> None:
        ax.set_xlabel("training time (s), evaluation excluded")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if legend:
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, accuracy = accuracy_figure(runs)
    finish(fig, fig.axes[0], "test_accuracy_vs_time.png",
           "test accuracy of the centre (%)" if accuracy else "validation bits per byte of the centre",
           title or ("Test accuracy against training time" if accuracy else "Validation loss against training time"))

    fig = error_figure(runs)
    if all(run["metric"].name == "accuracy" for run in runs):
        finish(fig, fig.axes[0], "test_error_vs_time.png", "test error (%), log scale",
               "Test error against training time")
    else:
        finish(fig, fig.axes[0], "test_error_vs_time.png", "validation bits per byte",
               "Validation loss against training time")

    with_leaders = [r for r in runs if any(rec.get("global_leader") is not None for rec in r["records"])]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in with_leaders:
        pts = [(r["train_seconds"], r["global_leader"]) for r in run["records"] if r.get("global_leader") is not None]
        ax.step([t for t, _ in pts], [leader for _, leader in pts], where="post", marker="o", label=run["name"])
    sizes = [r["config"].get("world_size") for r in with_leaders if r["config"].get("world_size")]
    if sizes:
        ax.set_yticks(range(max(sizes)))
    finish(fig, ax, "leader_over_time.png", "global leader (rank)", "Who leads", legend=bool(with_leaders))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run in runs:
        ax.plot([r["train_seconds"] for r in run["records"]], [bytes_of(r) / 1e6 for r in run["records"]], marker=".",
                label=f"{run['name']} ({run['label']})")
    finish(fig, ax, "communication.png", "MB communicated per worker", "Communication volume")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="horovod-leader-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="output folders of horovod_leader.train")
    parser.add_argument("--target", type=float, default=0.95, help="accuracy for the time-to-target column")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: next to the runs)")
    parser.add_argument("--title", default=None, help="the accuracy plot's title")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(Path(folder)) for folder in args.runs]
    except ValueError as error:
        print(f"horovod-leader-report: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarise(run, args.target) for run in runs]
    markdown = table(summaries, args.target)
    note = ("Times are training time (`train_seconds`): wall-clock time with evaluation and checkpoint writes "
            "excluded, as the papers measure it. `curve of` names the model that final acc., best acc. and the "
            "time to target measure: the centre of every method (the workers' average with batch norm "
            "re-estimated; EASGD's centre variable; DiLoCo's outer parameters), as the authors report it. "
            "`final leader` is LSGD's global leader in the last record. `trained (s)` flags a run that trained "
            "more than 5% past its budget.")
    (out / "report.md").write_text(markdown + "\n\n" + note + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    paths = plots(runs, out, args.title)
    print(markdown)
    print("\n" + note)
    print("\nplots: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
