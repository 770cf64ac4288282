"""Benchmark: how flat are the minima each method finds? Hessian trace and top eigenvalue.

    python benchmarks/flatness.py                                        # digits CNN, every method, 3 seeds
    python benchmarks/flatness.py --methods lsgd,dp --seeds 0 --epochs 1 --flatness-batches 1 --no-markdown --out /tmp/f
    python benchmarks/flatness.py --dataset DATASET --model MODEL        # another data set / model of the training command

Each run is ``horovod_leader.train --flatness`` on 4 ranks (2 groups of 2) with the same
budget in epochs (so the number of steps does not depend on the machine's load) and the same
hyperparameters for every method (the training command's algorithm defaults: period 4, and
32 for GRAWA). At the end the training command measures, on the first ``--flatness-batches``
training batches with the training loss and the model in evaluation mode, Hutchinson's trace
(100 Rademacher probes) and the largest eigenvalue (50 Lanczos steps) of the Hessian of what
the method outputs: the centre (the workers' average; EASGD's centre variable) and, for LSGD,
the global leader, which is LSGD's output and the model compared below. Mean and standard
deviation over seeds.

The GRAWA paper's measurement (DenseNet, CIFAR-100, 8 workers, 3 seeds) orders the methods
by trace MGRAWA < LGRAWA < EASGD < LSGD < data-parallel SGD and by top eigenvalue
EASGD < LSGD < MGRAWA < LGRAWA < data-parallel SGD; its claim is that GRAWA's minima are the
flattest. Both orderings, and the claim (each GRAWA variant below each of EASGD, LSGD and
data-parallel SGD), are checked on the means here, and each pairwise difference is set
against the spread over seeds.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mpi_launch import REPO  # noqa: E402

# The GRAWA paper's table (mean over 3 seeds), in its own method names.
PAPER = {"mgrawa": (164.9, 10.94), "lgrawa": (177.3, 13.34), "easgd": (194.0, 9.54), "lsgd": (194.7, 10.82),
         "dp": (435.7, 33.89)}
NAMES = {"lsgd": "LSGD (leader)", "mgrawa": "MGRAWA", "lgrawa": "LGRAWA", "easgd": "EASGD", "localsgd": "local SGD",
         "dp": "data-parallel SGD"}


def run_one(args, method: str, seed: int, out: Path) -> dict:
    options = ["--algo", method, "--dataset", args.dataset, "--model", args.model, "--epochs", str(args.epochs),
               "--seed", str(seed), "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--group-size", "2",
               "--checkpoint-every", "0", "--no-progress", "--flatness", "--flatness-batches",
               str(args.flatness_batches), "--out", str(out)]
    if args.data_dir:
        options += ["--data-dir", args.data_dir]
    cmd = ["mpirun", "-np", "4", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
    cmd += ["--oversubscribe"] if (os.cpu_count() or 1) < 4 else []
    cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd += [sys.executable, "-m", "horovod_leader.train", *options]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    shutil.rmtree(out, ignore_errors=True)  # the training command appends to an existing metrics.jsonl
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, timeout=args.timeout, stdout=subprocess.DEVNULL)
    from horovod_leader.training.report import accuracy_of, load_run

    last = load_run(out)["records"][-1]
    # What the method outputs: LSGD's global leader (none before the first global refresh).
    prefix = "leader_" if method == "lsgd" and "leader_hessian_trace" in last else ""
    return {"seed": seed, "steps": last["step"], "accuracy": accuracy_of(last), "measured": prefix + "hessian",
            "trace": last[prefix + "hessian_trace"], "top_eigenvalue": last[prefix + "hessian_top_eigenvalue"],
            "centre_trace": last["hessian_trace"], "centre_top_eigenvalue": last["hessian_top_eigenvalue"],
            "seconds": time.perf_counter() - start}


def mean_std(values, spec=".3g"):
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.mean(values):{spec}} ± {statistics.stdev(values):{spec}}"


def ordering(results: dict, key: str) -> list:
    return sorted(results, key=lambda m: statistics.mean(r[key] for r in results[m]))


def check_orderings(results: dict) -> dict:
    """The paper's orderings and claim, on the methods both here and in the paper."""
    common = [m for m in PAPER if m in results]
    verdict = {}
    for index, key in ((0, "trace"), (1, "top_eigenvalue")):
        paper = sorted(common, key=lambda m: PAPER[m][index])
        here = [m for m in ordering(results, key) if m in common]
        mean = {m: statistics.mean(r[key] for r in results[m]) for m in common}
        spread = {m: statistics.stdev(r[key] for r in results[m]) if len(results[m]) > 1 else 0.0 for m in common}
        # A pair is resolved when its means differ by more than the two seeds' spreads together.
        pairs = [(a, b) for i, a in enumerate(paper) for b in paper[i + 1:]]
        agree = [(a, b) for a, b in pairs if mean[a] < mean[b]]
        resolved = [(a, b) for a, b in pairs if abs(mean[a] - mean[b]) > spread[a] + spread[b]]
        grawa = [m for m in ("mgrawa", "lgrawa") if m in common]
        others = [m for m in ("easgd", "lsgd", "dp") if m in common]
        claim = all(mean[g] < mean[o] for g in grawa for o in others) if grawa and others else None
        verdict[key] = {"paper_order": paper, "measured_order": here, "same_order": here == paper,
                        "pairs_in_paper_order": f"{len(agree)}/{len(pairs)}",
                        "pairs_resolved_beyond_spread": f"{len(resolved)}/{len(pairs)}",
                        "grawa_flattest": claim}
    return verdict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lsgd,mgrawa,lgrawa,easgd,localsgd,dp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=float, default=30.0, help="training budget per run, in epochs")
    parser.add_argument("--dataset", default="digits", help="a --dataset of the training command")
    parser.add_argument("--model", default="cnn", help="a --model of the training command")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--flatness-batches", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run before it counts as hung")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    from report_tables import machine_description, markdown_table, today, update_section

    out = Path(args.out)
    runs_dir = out / "flatness_runs"
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for method in args.methods.split(","):
        results[method] = [run_one(args, method, seed, runs_dir / f"{method}-seed{seed}") for seed in seeds]
        rows = results[method]
        print(f"{method:9s} trace {mean_std([r['trace'] for r in rows])}, top eigenvalue "
              f"{mean_std([r['top_eigenvalue'] for r in rows])}, accuracy "
              f"{mean_std([100 * r['accuracy'] for r in rows], '.2f')} % ({statistics.mean(r['seconds'] for r in rows):.0f} s"
              " per run)", flush=True)
    verdict = check_orderings(results)
    rows = [[NAMES.get(m, m), mean_std([r["trace"] for r in runs]), mean_std([r["top_eigenvalue"] for r in runs]),
             mean_std([100 * r["accuracy"] for r in runs], ".2f"),
             "-" if m not in PAPER else f"{PAPER[m][0]:g} / {PAPER[m][1]:g}"] for m, runs in results.items()]
    table = markdown_table(["method", "Hessian trace", "top eigenvalue", "test accuracy %",
                            "paper: trace / top eigenvalue"], rows)
    lines = []
    for key, label in (("trace", "trace"), ("top_eigenvalue", "top eigenvalue")):
        v = verdict[key]
        lines.append(f"- By {label}: paper {' < '.join(NAMES[m] for m in v['paper_order'])}; here "
                     f"{' < '.join(NAMES[m] for m in v['measured_order'])}: "
                     f"{'the same order' if v['same_order'] else 'not the same order'} "
                     f"({v['pairs_in_paper_order']} pairs in the paper's order, {v['pairs_resolved_beyond_spread']} "
                     f"apart by more than their seeds' spreads). GRAWA flattest (every GRAWA variant run below every "
                     f"one of EASGD, LSGD and data-parallel SGD run): {'-' if v['grawa_flattest'] is None else ('yes' if v['grawa_flattest'] else 'no')}.")
    summary = "\n".join(lines)
    print(table + "\n\n" + summary)
    machine, command = machine_description(), " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "flatness.json").write_text(json.dumps(
        {"benchmark": "flatness", "machine": machine, "date": today(), "command": command,
         "settings": {**vars(args), "out": os.path.relpath(out, REPO)}, "paper": PAPER, "verdict": verdict,
         "results": results}, indent=2))
    if not args.no_markdown:
        steps = sorted({r["steps"] for runs in results.values() for r in runs})
        update_section("flatness", f"Machine: {machine}. Date: {today()}. 4 ranks (2 groups of 2), {args.dataset} / "
                       f"{args.model}, {len(seeds)} seeds, {args.epochs:g} epochs per run ({'/'.join(map(str, steps))} "
                       f"steps), lr {args.lr}, batch {args.batch_size} per worker; Hessian on the first "
                       f"{args.flatness_batches} training batches (100 probes, 50 Lanczos steps). Mean ± standard "
                       f"deviation over seeds.\nCommand: `{command}`\n\n{table}\n\n{summary}")


if __name__ == "__main__":
    main()
