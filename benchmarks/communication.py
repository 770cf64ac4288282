"""Benchmark: communication volume and throughput of every method, 4 ranks, in one run.

    python benchmarks/communication.py                  # both models, all methods
    python benchmarks/communication.py --steps 16 --models cnn --no-markdown --out /tmp/c   # tiny run

For each method: bytes per worker per step from the toolkit's ``comm_bytes``, checked
against the count from the algorithm's definition for the parameter payload P, and steps per
second per worker, as a ratio to DataParallel measured in the same run, on two models:

* ``mlp``: communication-heavy, 10.5M parameters, batch 16 of random 28x28 inputs;
* ``cnn``: the compute-heavy-for-its-size digits CNN, batch 32 of digits.

Every configuration steps a multiple of its period (256 steps by default, after 64 warm-up
steps), so its refreshes are counted whole.
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def launch(args):
    from mpi_launch import relaunch
    from report_tables import machine_description, markdown_table, today, update_section

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "communication_raw.json"
    relaunch(__file__, ["--steps", str(args.steps), "--models", args.models, "--out", str(raw)])
    runs = json.loads(raw.read_text())
    machine, command = machine_description(), " ".join(["python"] + sys.argv)
    sections = []
    for model, rows in runs.items():
        dp = next(r for r in rows if r["name"] == "DataParallel")
        table = markdown_table(
            ["method", "bytes/step/worker (measured)", "from the definition", "measured / definition",
             "bytes vs DataParallel", "steps/s per worker", "speed vs DataParallel"],
            [[r["name"], f"{r['bytes_per_step']:,.0f}", f"{r['theory']:,.0f}", f"{r['bytes_per_step'] / r['theory']:.3f}",
              f"{r['bytes_per_step'] / dp['bytes_per_step']:.4f}", f"{r['steps_per_s']:.1f}",
              f"{r['steps_per_s'] / dp['steps_per_s']:.2f}x"] for r in rows])
        sections.append(f"**{model}** (P = {rows[0]['payload']:,} bytes of float32 parameters)\n\n{table}")
        print(f"\n{model}\n{table}")
    result = {"benchmark": "communication", "machine": machine, "date": today(), "command": command, "runs": runs}
    (out / "communication.json").write_text(json.dumps(result, indent=2))
    plot(runs, out / "communication.png")
    if not args.no_markdown:
        update_section("communication", f"Machine: {machine}. Date: {today()}. 4 ranks on one machine "
                       f"(shared-memory transport).\nCommand: `{command}`\n\n" + "\n\n".join(sections) +
                       "\n\nPlot: `benchmarks/results/communication.png`")


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model, rows in runs.items():
        dp = next(r for r in rows if r["name"] == "DataParallel")
        names = [r["name"] for r in rows]
        axes[0].barh([f"{n} [{model}]" for n in names], [r["bytes_per_step"] / dp["bytes_per_step"] for r in rows])
        axes[1].barh([f"{n} [{model}]" for n in names], [r["steps_per_s"] / dp["steps_per_s"] for r in rows])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("bytes per step, relative to DataParallel")
    axes[1].set_xlabel("steps per second, relative to DataParallel")
    axes[1].axvline(1.0, color="k", lw=0.8)
    for ax in axes:
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worker(args):
    import horovod.torch as hvd
    import torch

    import horovod_leader as hl
    from horovod_leader.training.data import digits, shard
    from horovod_leader.training.models import DigitsCNN
    from method_runs import CONFIGS, MLP, build_wrapper, theoretical_bytes_per_step, timed_steps

    hl.init(group_size=4)
    rank, size = hvd.rank(), hvd.size()
    gen = torch.Generator().manual_seed(rank)
    train, _ = digits()
    mine = shard(train, rank, size)
    data = {
        "mlp": (MLP, [(torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen))
                      for _ in range(8)]),
        "cnn": (DigitsCNN, [(mine.tensors[0][i:i + 32], mine.tensors[1][i:i + 32]) for i in range(0, 320, 32)]),
    }
    results = {}
    for model_name in args.models.split(","):
        make_model, batches = data[model_name]
        rows = []
        for name, options in CONFIGS:
            hl.init(group_size=int(options[options.index("--group-size") + 1]))
            torch.manual_seed(0)
            model = make_model()
            opt, sgd = build_wrapper(options, model)
            payload = sum(p.numel() * p.element_size() for p in model.parameters())
            measured = timed_steps(opt, sgd, model, batches, args.steps, warmup=64)
            rates = hvd.allgather(torch.tensor([measured["steps_per_s"]]), name="bench.rates").tolist()
            rows.append({"name": name, "payload": payload, "bytes_per_step": measured["bytes_per_step"],
                         "theory": theoretical_bytes_per_step(options, payload, len(list(model.parameters()))),
                         "steps_per_s": sum(rates) / len(rates), "steps_per_s_per_rank": rates})
            if rank == 0:
                print(f"{model_name:4s} {name:38s} {rows[-1]['bytes_per_step']:14,.0f} B/step "
                      f"{rows[-1]['steps_per_s']:8.1f} steps/s", flush=True)
        results[model_name] = rows
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    hvd.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256, help="timed steps per configuration (a multiple of 64)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else launch(args)
