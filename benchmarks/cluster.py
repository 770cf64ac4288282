"""Benchmark: the papers' claims on an emulated cluster with slow links, and over shared memory.

    python benchmarks/cluster.py                       # the core grid: 6 methods x 3 rates x 3 seeds
    python benchmarks/cluster.py --extended            # and DiLoCo, compressed LSGD/GRAWA, LGRAWA, ..., 4x1, 10gbit
    python benchmarks/cluster.py --rates shm --methods lsgd,dp --seeds 0 --budget 5 --no-markdown --out /tmp/c
    python benchmarks/cluster.py --section cluster_overlap --rates 100mbit,1gbit \
        --methods nocomm,lsgd,lsgd-ov2,mgrawa,mgrawa-ov2,...   # overlapped rounds (-ovD: overlap d = D)
    python benchmarks/cluster.py --task lm --section language_model ...   # the byte-level GPT

Every run is ``horovod_leader.train --preset paper`` on MNIST-1D with the wide MLP (``--task
lm``: the byte-level GPT on the Python standard library's sources, AdamW inside every method,
validation bits per byte instead of accuracy), for the same training-time budget (``--time-budget``, evaluation excluded), each method at its
stated periods. A rate such as ``100mbit`` or ``1gbit`` runs on the emulated cluster
(``launch/emulated_cluster.sh``, as root: network namespaces joined by links limited to that
rate, no added latency, one machine's CPU shared by every node); ``shm`` runs one node of
all the ranks over shared memory, in groups of the same size as the emulated nodes.

For each rate and method, over the seeds: time to target on the training clock (the target
is data-parallel SGD's mean final accuracy at that rate), the final accuracy of the centre
(every method's headline, as the authors report it), steps per second and their share of the
communication-free run's (``nocomm``: local SGD with no round inside the budget, the compute
limit, measured in the same grid), bytes per step from the toolkit's ``comm_bytes``
accounting, and the bytes that crossed each node's link while the training clock ran, from
the node's interface counters (see ``cluster_rank.py``). The communication-free run on the
emulated cluster against the same run over shared memory measures what the emulator itself
costs the computation (target: within 5%). A plot of test error against training time, one
panel per rate.

Resumable: each run leaves ``OUT/cluster_runs/NAME.json`` and is skipped when that file is
there (``--retry-failed`` runs failed ones again). ``OUT/SECTION.json`` and
``OUT/SECTION*.png`` collect everything (``SECTION``: ``--section``, default ``cluster``); the
Markdown goes into BENCHMARKS.md's section of that name unless ``--no-markdown``.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mpi_launch import REPO  # noqa: E402

EMULATOR = REPO / "launch" / "emulated_cluster.sh"
RANK_PROGRAM = HERE / "cluster_rank.py"
# Methods run by another rank program than the training command's (the peers, benchmarks/peers/):
# name -> the program, which takes ``--link-counters DIR`` and the training command's options.
PROGRAMS: Dict[str, Path] = {}
PROGRAM_CHECKS: Dict[str, Callable[[], Optional[str]]] = {}  # name -> why it cannot run here, or None

# name -> options of horovod_leader.train (added to --preset paper); the periods are written
# out so that the grid keeps them whatever the preset becomes.
METHODS: Dict[str, List[str]] = {
    "lsgd": ["--algo", "lsgd", "--period", "4", "--global-period", "16"],
    "mgrawa": ["--algo", "mgrawa", "--period", "32"],
    "easgd": ["--algo", "easgd", "--period", "16"],
    "localsgd": ["--algo", "localsgd", "--period", "16"],
    "dp": ["--algo", "dp"],
    "lsgd-async": ["--algo", "lsgd", "--async", "--period", "4", "--global-period", "16"],
    # The compute limit: local SGD whose period is longer than any run, so no round happens.
    "nocomm": ["--algo", "localsgd", "--period", "1000000000"],
}
EXTENDED_METHODS: Dict[str, List[str]] = {
    "diloco": ["--algo", "diloco", "--period", "16"],
    "lsgd-bf16": METHODS["lsgd"] + ["--compression", "bf16"],
    "lsgd-int8": METHODS["lsgd"] + ["--compression", "int8"],
    "lsgd-tauG64": ["--algo", "lsgd", "--period", "16", "--global-period", "64"],  # int8 at 16's bytes, uncompressed
    "mgrawa-bf16": METHODS["mgrawa"] + ["--compression", "bf16"],
    "mgrawa-int8": METHODS["mgrawa"] + ["--compression", "int8"],
    "lgrawa": ["--algo", "lgrawa", "--period", "32"],
    "mgrawa-async": ["--algo", "mgrawa", "--async", "--period", "32"],
    "easgd-async": ["--algo", "easgd", "--async", "--period", "16"],
}
# Overlapped rounds: each method with its round applied d steps after it is posted (``-ovD``).
OVERLAPPED = {"lsgd": (1, 2, 3), "mgrawa": (1, 2, 4, 8, 16), "localsgd": (1, 2, 4, 8, 12), "diloco": (1, 2, 4, 8, 12),
              "easgd": (1, 2, 4)}
for _base, _delays in OVERLAPPED.items():
    for _d in _delays:
        EXTENDED_METHODS[f"{_base}-ov{_d}"] = [*(METHODS.get(_base) or EXTENDED_METHODS[_base]), "--overlap", str(_d)]
ALL_METHODS = {**METHODS, **EXTENDED_METHODS}
# The language-model task (``--task lm``): the training command's options that replace MNIST-1D's.
TASKS = {
    "mnist1d": ["--preset", "paper", "--dataset", "mnist1d"],
    # AdamW inside every method (DiLoCo's paper's inner optimizer), no preset (the papers' are for images)
    "lm": ["--dataset", "pystdlib", "--model", "gpt", "--inner-optimizer", "adamw", "--lr", "0.001",
           "--weight-decay", "0.01", "--batch-size", "16", "--eval-subset", "256"],
}
#: seconds a run spends outside its training clock (start-up, evaluations), measured on the
#: 2-core development machine: the language model's evaluations are most of its run
RUN_OVERHEAD_S = {"mnist1d": 60, "lm": 220}
RATES, EXTENDED_RATES = ["100mbit", "1gbit", "shm"], ["10gbit"]
SHAPES, EXTENDED_SHAPES = ["2x2"], ["4x1"]


def emulator_unavailable() -> Optional[str]:
    """Why the emulated cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root (the emulated cluster creates network namespaces, veth pairs, a bridge and tc qdiscs)"
    for tool in ("ip", "tc", "unshare", "mpirun"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    probe = f"hl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces cannot be made here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def parse_shape(text: str):
    nodes, _, ranks = text.partition("x")
    if not (nodes.isdigit() and ranks.isdigit() and int(nodes) >= 1 and int(ranks) >= 1):
        raise ValueError(f"--nodes: expected NODESxRANKS such as 2x2, got {text!r}")
    return int(nodes), int(ranks)


def train_options(args, method: str, seed: int, ranks_per_node: int, rate: str, out: Path) -> List[str]:
    task = TASKS[args.task] if args.task == "lm" else [*TASKS["mnist1d"], "--model", args.model]
    options = [*task, *ALL_METHODS[method],
               "--time-budget", str(args.budget), "--eval-every", str(args.eval_every or args.budget / 10),
               "--seed", str(seed), "--checkpoint-every", "0", "--no-progress", "--out", str(out)]
    if rate == "shm":
        options += ["--group-size", str(ranks_per_node)]  # emulated nodes: the groups follow the nodes
    if args.width is not None:
        options += ["--width", str(args.width)]
    if args.samples is not None:
        options += ["--mnist1d-samples", str(args.samples)]
    return options


def unavailable_reason(method: str) -> Optional[str]:
    """Why this training command cannot run ``method`` (an option it does not have), or None;
    for a method of another program (``PROGRAMS``), its own check (``PROGRAM_CHECKS``)."""
    from horovod_leader.training.command import build_parser

    if method in PROGRAMS:
        return PROGRAM_CHECKS.get(method, lambda: None)()
    try:
        build_parser().parse_args(ALL_METHODS[method] + ["--dataset", "mnist1d"])  # an option it lacks
    except ValueError as error:
        return f"the training command refuses {' '.join(ALL_METHODS[method])}: {error}"
    return None


def launch_command(rate: str, nodes: int, ranks: int, options: List[str], link_dir: Path,
                   program: Path = RANK_PROGRAM, engine: str = "horovod"):
    """(command, extra environment) of one run: mpirun (the Horovod engine) or torchrun (the
    torch engine), over shared memory or on the emulated cluster."""
    if engine == "torch":
        env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if rate == "shm":
            return [sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(nodes * ranks), str(program), *options], env
        cmd = ["bash", str(EMULATOR), str(nodes), str(ranks), str(program), "--link-counters", str(link_dir)]
        return cmd + options, {**env, "LINK_RATE": rate, "EMULATED_LAUNCHER": "torchrun"}
    if rate == "shm":
        cmd = ["mpirun", "-np", str(nodes * ranks), "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
        cmd += ["--oversubscribe"] if nodes * ranks > (os.cpu_count() or 1) else []
        cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return cmd + [sys.executable, "-u", str(program), *options], {}
    env = {"LINK_RATE": rate, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", str(EMULATOR), str(nodes), str(ranks), str(program), "--link-counters", str(link_dir)]
    return cmd + options, env


def run_process(cmd, env, timeout: float):
    """(exit status or None on timeout, output). On a timeout the process group gets SIGTERM
    first, so that the emulator still removes its namespaces and links."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=str(REPO), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        return None, out


def run_one(args, run: Dict, runs_dir: Path) -> Dict:
    """Train one configuration and summarise it into ``runs_dir/NAME.json``."""
    from cluster_summary import summarise_run

    name, folder = run["name"], runs_dir / run["name"]
    shutil.rmtree(folder, ignore_errors=True)  # the training command appends to an existing metrics.jsonl
    link_dir = folder / "link_counters"
    options = train_options(args, run["method"], run["seed"], run["ranks_per_node"], run["rate"], folder)
    engine = run.get("engine", "horovod")
    if engine != "horovod":
        options += ["--backend", engine]
    cmd, env = launch_command(run["rate"], run["nodes"], run["ranks_per_node"], options, link_dir,
                              PROGRAMS.get(run["method"], RANK_PROGRAM), engine)
    start = time.perf_counter()
    status, output = run_process(cmd, env, args.timeout or 3 * args.budget + 600)
    shown = [os.path.relpath(o, REPO) if o.startswith(str(REPO)) else o for o in map(str, options)]  # no machine paths
    result = {**run, "options": shown, "elapsed_s": time.perf_counter() - start, "returncode": status}
    if status == 0:
        result.update(status="ok", **summarise_run(folder, link_dir, args.parameter_bytes))
    else:
        result.update(status="failed" if status is not None else "timed out", output_tail=output[-4000:])
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # tens of MB per run, never read again
    (runs_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def parameter_bytes(args) -> int:
    """P: the model's float32 parameter payload, the unit of every byte count."""
    from horovod_leader.training import models

    if args.task == "lm":
        return 4 * models.parameter_count(models.build("gpt", 256, 1))
    model = models.build(args.model, 10, 1, input_shape=(1, 40), width=args.width)
    return 4 * models.parameter_count(model)


def prepare_data(args) -> None:
    """Generate (or find) the cached MNIST-1D arrays once, before any run is timed."""
    from horovod_leader.training import data

    start = time.perf_counter()
    if args.task == "lm":
        data.load("pystdlib")
    else:
        data.load("mnist1d", samples=args.samples)
    print(f"{args.task} data ready ({time.perf_counter() - start:.1f} s)", flush=True)


def setting(args) -> Dict:
    """What every run of one grid shares; a results folder holds one setting."""
    setting = {"model": args.model, "width": args.width, "samples": args.samples, "eval_every": args.eval_every}
    return setting if args.task == "mnist1d" else {**setting, "task": args.task}


def build_grid(args) -> List[Dict]:
    runs = []
    for seed in args.seed_list:  # seed-major: an interrupted grid has whole seeds
        for shape in args.shape_list:
            nodes, ranks = parse_shape(shape)
            for rate in args.rate_list:
                for engine in args.engine_list:
                    for method in args.method_list:
                        if engine != "horovod" and method in PROGRAMS:  # a peer's program has its own launch
                            continue
                        tag = "" if engine == "horovod" else f"-{engine}"  # the Horovod engine's names stay
                        runs.append({"name": f"{rate}-{shape}-{method}{tag}-seed{seed}", "rate": rate,
                                     "shape": shape, "nodes": nodes, "ranks_per_node": ranks, "method": method,
                                     "engine": engine, "seed": seed, "budget": args.budget,
                                     "setting": setting(args)})
    return runs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(ALL_METHODS)} "
                        f"(default: {','.join(METHODS)}; --extended adds the rest)")
    parser.add_argument("--rates", default=None, help="link rates in tc's syntax, or shm for shared memory only "
                        f"(default: {','.join(RATES)}; --extended adds {','.join(EXTENDED_RATES)})")
    parser.add_argument("--nodes", default=None, help="node shapes NODESxRANKS (default: 2x2; --extended adds 4x1)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--engines", default="horovod", help="comma-separated engines: horovod (mpirun) and torch "
                        "(torchrun: torch.distributed over Gloo)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training per run (training clock)")
    parser.add_argument("--eval-every", type=float, default=None, help="seconds of training between evaluations "
                        "(default: budget / 10; each one costs seconds of wall time on the wide MLP)")
    parser.add_argument("--extended", action="store_true", help="the extended grid's methods, rates and shapes")
    parser.add_argument("--task", default="mnist1d", choices=tuple(TASKS), help="mnist1d: MNIST-1D classification "
                        "(--model); lm: a byte-level GPT on the Python standard library's sources (AdamW inside "
                        "every method, validation bits per byte)")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn1d"))
    parser.add_argument("--width", type=int, default=None, help="the MLP's width (default: the training command's)")
    parser.add_argument("--samples", type=int, default=None, help="MNIST-1D signals (default: the training "
                        "command's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it counts as hung "
                        "(default: 3 x budget + 600)")
    parser.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results, and "
                        "benchmarks/results/lm for --task lm: one folder holds one setting)")
    parser.add_argument("--section", default="cluster", help="the BENCHMARKS.md section it rewrites, and the stem of "
                        "its JSON and plot files (another name keeps, say, the compression comparison beside the "
                        "core grid)")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    pick = lambda given, core, extra: given.split(",") if given else core + (extra if args.extended else [])
    args.method_list = pick(args.methods, list(METHODS), list(EXTENDED_METHODS))
    args.rate_list = pick(args.rates, RATES, EXTENDED_RATES)
    args.shape_list = pick(args.nodes, SHAPES, EXTENDED_SHAPES)
    args.engine_list = args.engines.split(",")
    if not set(args.engine_list) <= {"horovod", "torch"}:
        parser.error(f"--engines: expected horovod and/or torch, got {args.engines!r}")
    unknown = [m for m in args.method_list if m not in ALL_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {list(ALL_METHODS)}")
    for shape in args.shape_list:
        try:
            parse_shape(shape)
        except ValueError as error:
            parser.error(str(error))
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.budget <= 0:
        parser.error(f"--budget must be > 0, got {args.budget}")
    emulated = [r for r in args.rate_list if r != "shm"]
    if emulated:
        reason = emulator_unavailable()
        if reason:
            parser.error(f"--rates {','.join(emulated)} need the emulated cluster, which cannot run here: {reason}. "
                         "Use --rates shm.")
    return args


def main(argv=None, command: Optional[List[str]] = None) -> int:
    """Run the grid, then write its summary. ``command``: the program and arguments to record as
    the command that made the results (a wrapper's own, such as ``benchmarks/peers/run.py``)."""
    args = parse_args(argv)
    from cluster_summary import write_outputs

    out = Path(args.out or HERE / "results" / ("lm" if args.task == "lm" else ""))
    runs_dir = out / "cluster_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    skipped = {m: why for m in args.method_list if (why := unavailable_reason(m))}
    for method, why in skipped.items():
        print(f"not run: {method}: {why}", flush=True)
    args.parameter_bytes = parameter_bytes(args)
    grid = [run for run in build_grid(args) if run["method"] not in skipped]
    done = {}
    for run in grid:
        path = runs_dir / f"{run['name']}.json"
        if path.exists():
            previous = json.loads(path.read_text())
            mine = (run["budget"], run["setting"])
            if (previous["budget"], previous.get("setting")) != mine:
                sys.exit(f"{path} was made with --budget {previous['budget']:g} and {previous.get('setting')}, not "
                         f"--budget {run['budget']:g} and {run['setting']}: use another --out, or the same options")
            if previous["status"] == "ok" or not args.retry_failed:
                done[run["name"]] = previous
    todo = [run for run in grid if run["name"] not in done]
    overhead = RUN_OVERHEAD_S[args.task]
    print(f"{len(grid)} runs, {len(done)} already done, {len(todo)} to run: about "
          f"{len(todo) * (args.budget + overhead) / 60:.0f} min at {args.budget:g} s of training and ~{overhead} s of "
          "start-up and evaluation each on an idle machine", flush=True)
    if todo:
        prepare_data(args)
    for i, run in enumerate(todo, 1):
        result = run_one(args, run, runs_dir)
        done[run["name"]] = result
        if result["status"] == "ok":
            accuracy = "-" if result["final_accuracy"] is None else f"{result['final_accuracy']:.4f}"
            print(f"[{i}/{len(todo)}] {run['name']}: {result.get('metric', 'accuracy')} {accuracy} at "
                  f"{result['train_seconds']:.1f} s, {result['steps_per_s']:.2f} steps/s, "
                  f"{result['comm_bytes_per_step'] / 1e6:.2f} MB/step/worker ({result['elapsed_s']:.0f} s)", flush=True)
        else:
            print(f"[{i}/{len(todo)}] {run['name']}: {result['status']} (exit {result['returncode']}); "
                  f"output tail:\n{result['output_tail'][-1500:]}", flush=True)
    results = [done[run["name"]] for run in grid]
    shown = command or ["benchmarks/cluster.py", *(argv if argv is not None else sys.argv[1:])]
    write_outputs(args, results, skipped, out, command=" ".join(["python", *shown]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
