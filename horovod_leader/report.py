"""Turn training runs into a comparison: a Markdown table and the papers' plots.

    python -m horovod_leader.report runs/lsgd runs/dp runs/easgd --target 0.95 --out runs/report

For each run folder (written by ``horovod_leader.train``): final and best test accuracy, the
training time to reach ``--target`` accuracy, steps per second of training, and bytes
communicated per step per worker. Plots: test error against training time (the papers'
figure), the global leader's identity over time, and communication volume over time.

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
    label = config.get("algo", folder.name) + (" async" if config.get("asynchronous") else "")
    return {"name": folder.name, "label": label, "config": config, "records": records}


def accuracy_of(record: Dict) -> Optional[float]:
    """The accuracy the papers report: LSGD's leader, otherwise the centre (or rank 0's worker)."""
    for key in ("leader_accuracy", "centre_accuracy", "worker0_accuracy"):
        if record.get(key) is not None:
            return float(record[key])
    return None


def bytes_of(record: Dict) -> float:
    value = record.get("comm_bytes", 0)
    return float(value[0] if isinstance(value, list) else value)


def summarise(run: Dict, target: float) -> Dict:
    records = run["records"]
    accs = [(r["train_seconds"], accuracy_of(r)) for r in records if accuracy_of(r) is not None]
    last = records[-1]
    reached = next((t for t, a in accs if a >= target), None)
    steps = max(last["step"], 1)
    return {"run": run["name"], "method": run["label"], "final_accuracy": accs[-1][1] if accs else None,
            "best_accuracy": max(a for _, a in accs) if accs else None, "time_to_target_s": reached,
            "steps_per_s": last["step"] / last["train_seconds"] if last["train_seconds"] > 0 else None,
            "bytes_per_step": bytes_of(last) / steps, "steps": last["step"],
            "train_seconds": last["train_seconds"], "wall_seconds": last["wall_seconds"],
            "final_group_centre_accuracies": last.get("group_centre_accuracies"),
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
    lines = [f"| run | method | final acc. | best acc. | training time to {target:.2f} (s) | steps/s | "
             "bytes/step/worker | Hessian trace | top eigenvalue |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['run']} | {s['method']} | {fmt(s['final_accuracy'], '.4f')} | "
                     f"{fmt(s['best_accuracy'], '.4f')} | {fmt(s['time_to_target_s'], '.1f')} | "
                     f"{fmt(s['steps_per_s'], '.1f')} | {fmt(s['bytes_per_step'], ',.0f')} | "
                     f"{flatness_cell(s, 'hessian_trace')} | {flatness_cell(s, 'hessian_top_eigenvalue')} |")
    return "\n".join(lines)


def plots(runs: List[Dict], out: Path) -> List[Path]:
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

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        pts = [(r["train_seconds"], accuracy_of(r)) for r in run["records"] if accuracy_of(r) is not None]
        ax.plot([t for t, _ in pts], [100 * (1.0 - a) for _, a in pts], marker=".",
                label=f"{run['name']} ({run['label']})")
    finish(fig, ax, "test_error_vs_time.png", "test error (%)", "Test error against time (LSGD: leader; others: centre)")

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
            "excluded, as the papers measure it.")
    (out / "report.md").write_text(markdown + "\n\n" + note + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    paths = plots(runs, out)
    print(markdown)
    print("\n" + note)
    print("\nplots: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
