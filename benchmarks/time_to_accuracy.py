"""Benchmark: time to a target test accuracy, and accuracy at a fixed budget, every method.

    python benchmarks/time_to_accuracy.py                                   # digits, 3 seeds
    python benchmarks/time_to_accuracy.py --budget 2 --seeds 0 --methods lsgd,dp --no-markdown --out /tmp/t
    # CIFAR-10 with ResNet-20, where the data is at hand (cifar-10-batches-py under DATA):
    python benchmarks/time_to_accuracy.py --dataset cifar10 --data-dir DATA --model resnet20 \\
        --budget 1800 --target 0.85 --lr 0.1 --batch-size 128 --eval-every 30

Each run is ``horovod_leader.train`` on 4 ranks for the same wall-clock budget with the same
hyperparameters for every method (the papers' algorithm defaults; LR and batch size set
below). The accuracy is what the papers report: LSGD's global leader, the centre for the
others (the workers' average; EASGD's centre variable). Mean and standard deviation over
seeds; a run that never reaches the target counts as not reaching it (shown as n/3).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mpi_launch import REPO  # noqa: E402


def run_one(args, method, seed, out):
    options = ["--algo", method, "--dataset", args.dataset, "--model", args.model, "--time-budget", str(args.budget),
               "--seed", str(seed), "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--eval-every",
               str(args.eval_every), "--checkpoint-every", "0", "--group-size", "2", "--no-progress", "--out", str(out)]
    if args.data_dir:
        options += ["--data-dir", args.data_dir]
    cmd = ["mpirun", "-np", "4", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
    cmd += ["--oversubscribe"] if (os.cpu_count() or 1) < 4 else []
    cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd += [sys.executable, "-m", "horovod_leader.train", *options]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, timeout=120 + 3 * args.budget, stdout=subprocess.DEVNULL)
    from horovod_leader.training.report import accuracy_of, load_run

    records = load_run(Path(out))["records"]
    curve = [(r["train_seconds"], accuracy_of(r)) for r in records if accuracy_of(r) is not None]
    reached = next((t for t, a in curve if a >= args.target), None)
    return {"time_to_target": reached, "final_accuracy": curve[-1][1], "curve": curve}


def mean_std(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lsgd,mgrawa,lgrawa,easgd,localsgd,dp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of training per run")
    parser.add_argument("--target", type=float, default=0.96)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=float, default=0.5)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    from report_tables import machine_description, markdown_table, today, update_section

    out = Path(args.out)
    runs_dir = out / "time_to_accuracy_runs"
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for method in args.methods.split(","):
        results[method] = [run_one(args, method, seed, runs_dir / f"{method}-seed{seed}") for seed in seeds]
        times = [r["time_to_target"] for r in results[method] if r["time_to_target"] is not None]
        print(f"{method:9s} time to {args.target}: {mean_std(times)} s ({len(times)}/{len(seeds)}), accuracy at "
              f"{args.budget:g} s: {mean_std([100 * r['final_accuracy'] for r in results[method]])} %", flush=True)
    rows = []
    for method, runs in results.items():
        times = [r["time_to_target"] for r in runs if r["time_to_target"] is not None]
        rows.append([method, f"{mean_std(times)} ({len(times)}/{len(runs)})",
                     mean_std([100 * r["final_accuracy"] for r in runs])])
    table = markdown_table(["method", f"seconds to {args.target:.0%} test accuracy (runs reaching it)",
                            f"test accuracy % at {args.budget:g} s"], rows)
    print(table)
    machine, command = machine_description(), " ".join(["python"] + sys.argv)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time_to_accuracy.json").write_text(json.dumps(
        {"benchmark": "time_to_accuracy", "machine": machine, "date": today(), "command": command,
         "settings": {**vars(args), "out": os.path.relpath(out, REPO)}, "results": results}, indent=2))
    plot(results, out / "time_to_accuracy.png", args)
    if not args.no_markdown:
        update_section("time_to_accuracy", f"Machine: {machine}. Date: {today()}. 4 ranks (2 groups of 2), "
                       f"{args.dataset} / {args.model}, {len(seeds)} seeds, {args.budget:g} s per run, lr {args.lr}, "
                       f"batch {args.batch_size} per worker.\nCommand: `{command}`\n\n{table}\n\n"
                       "Plot: `benchmarks/results/time_to_accuracy.png`")


def plot(results, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (method, runs) in enumerate(results.items()):
        for j, run in enumerate(runs):
            ax.plot([t for t, _ in run["curve"]], [100 * (1 - a) for _, a in run["curve"]], color=f"C{i}",
                    alpha=0.8, label=method if j == 0 else None)
    ax.axhline(100 * (1 - args.target), color="k", lw=0.8, ls="--")
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("test error (%)")
    ax.set_yscale("log")
    ax.set_title(f"{args.dataset}: test error against time, one line per seed")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
