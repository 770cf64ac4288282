"""Benchmark: one straggler among 4 ranks, synchronous against asynchronous LSGD and GRAWA.

    python benchmarks/straggler.py                       # 4 ranks, rank 3 three times slower
    python benchmarks/straggler.py --budget 2 --no-markdown --out /tmp/s   # a tiny run
    python benchmarks/straggler.py --link-rate 1gbit     # on an emulated cluster of 2 nodes x 2 ranks

With ``--link-rate`` (as root, where network namespaces can be made) the 4 ranks run on
``launch/emulated_cluster.sh`` (2 nodes of 2 ranks joined by links of that rate), so that the
asynchronous rounds cross a real TCP link and the global step count is served over TCP; the
results go to ``straggler_emulated.json`` and the ``straggler_emulated`` section.

Rank 3 is slowed by a known factor: after each forward and backward pass it sleeps
(factor - 1) times the time that computation took it. Each configuration trains the digits
CNN for the same wall-clock budget; the synchronous runs stop on rank 0's clock, agreed at
every step as the training command does (``AgreedClock``: all ranks take the same number of
steps), the asynchronous ones stop each rank at its own deadline and close. The time of
``close()`` (the rounds still due after the last step) is part of each run. Reported: the fast
ranks' steps per second in each mode, their ratio, the test accuracy at the budget of the
centre (the workers' average, as the authors report both methods), and the
asynchronous staleness: the worst lag, in rounds, between the global count and a round's
start (``rounds_history``), with the share of rounds started during training.
"""
import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


#: asynchronous rounds should rarely make a fast rank wait: the share of its rounds in which it
#: waited for the round in flight (the overlap issue's target, for LSGD)
WAIT_TARGET = 0.10


def launch(args) -> None:
    """Run this file under mpirun (4 ranks) in worker mode, then write tables and plots."""
    from report_tables import machine_description, markdown_table, today, update_section

    from mpi_launch import relaunch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "straggler_emulated" if args.link_rate else "straggler"
    raw = out / f"{stem}_raw.json"
    worker_args = ["--budget", str(args.budget), "--factor", str(args.factor), "--out", str(raw)]
    if args.link_rate:
        run_emulated(args.link_rate, worker_args, timeout=120 + 8 * args.budget)
    else:
        relaunch(__file__, worker_args, timeout=60 + 8 * args.budget)
    runs = json.loads(raw.read_text())
    rows, summary = [], {}
    for algo in ("lsgd", "grawa"):
        sync, asyn = runs[f"{algo}-sync"], runs[f"{algo}-async"]
        fast_sync = sum(sync["steps_per_s"][:3]) / 3
        fast_async = sum(asyn["steps_per_s"][:3]) / 3
        summary[algo] = {"fast_steps_per_s_sync": fast_sync, "fast_steps_per_s_async": fast_async,
                         "ratio": fast_async / fast_sync, "accuracy_sync": sync["accuracy"],
                         "accuracy_async": asyn["accuracy"], "slow_steps_per_s_sync": sync["steps_per_s"][3],
                         "slow_steps_per_s_async": asyn["steps_per_s"][3]}
        s = summary[algo]
        s.update({key: asyn[key] for key in ("period", "worst_lag_rounds", "rounds_started_during_training",
                                             "rounds_total", "waits_per_rank")})
        during = min(asyn["rounds_started_during_training"]) / max(asyn["rounds_total"], 1)
        fast_waits = asyn["waits_per_rank"][:3]  # the fast ranks: what running ahead should spare
        s["fast_waits_share"] = max(fast_waits) / max(asyn["rounds_total"], 1)
        rows.append([algo.upper(), str(asyn["period"]), f"{fast_sync:.1f}", f"{fast_async:.1f}", f"{s['ratio']:.2f}x",
                     f"{s['slow_steps_per_s_sync']:.1f} / {s['slow_steps_per_s_async']:.1f}",
                     f"{s['accuracy_sync']:.3f}", f"{s['accuracy_async']:.3f}",
                     f"{asyn['worst_lag_rounds']} ({100 * during:.0f}% in training)",
                     f"{min(fast_waits)}-{max(fast_waits)} of {asyn['rounds_total']} "
                     f"({100 * s['fast_waits_share']:.0f}%)"])
    machine = machine_description()
    command = " ".join(["python"] + sys.argv)
    where = (f"an emulated cluster of 2 nodes x 2 ranks, links of {args.link_rate} (rank 3 on the second node)"
             if args.link_rate else "one node, shared memory")
    result = {"benchmark": stem, "machine": machine, "date": today(), "command": command, "where": where,
              "budget_s": args.budget, "factor": args.factor, "summary": summary, "runs": runs}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(summary, out / f"{stem}.png", args)
    table = markdown_table(["method", "period τ", "fast ranks, steps/s sync", "fast ranks, steps/s async",
                            "async / sync", "slow rank steps/s (sync / async)", "centre test acc. sync", "centre test acc. async",
                            "worst staleness, rounds (rounds started during training)",
                            "async: rounds a fast rank waited for the one in flight"], rows)
    waits = "\n".join(f"- {algo.upper()}: asynchronous fast ranks waited for the round in flight in at most "
                      f"{100 * summary[algo]['fast_waits_share']:.0f}% of their rounds (target: fewer than "
                      f"{100 * WAIT_TARGET:.0f}%): **{'met' if summary[algo]['fast_waits_share'] < WAIT_TARGET else 'not met'}**"
                      for algo in ("lsgd", "grawa"))
    table = f"{table}\n\n{waits}"
    print(table)
    if not args.no_markdown:
        update_section(stem, f"Machine: {machine}. Date: {today()}. 4 ranks on {where}, rank 3 slowed "
                             f"{args.factor}x, {args.budget} s per configuration including `close()`, digits CNN, "
                             "LSGD with one group (τ = τ_G = 4), MGRAWA τ = 8.\n"
                             f"Command: `{command}`\n\n{table}\n\n"
                             f"Plot: `benchmarks/results/{stem}.png`")


def run_emulated(rate: str, worker_args, timeout: float) -> None:
    """The worker on the emulated cluster: 2 nodes of 2 ranks, links of ``rate``. Launched as the
    cluster benchmark launches its runs, so a timeout still lets the emulator remove its
    namespaces and links."""
    from cluster import EMULATOR, emulator_unavailable, run_process

    reason = emulator_unavailable()
    if reason:
        sys.exit(f"--link-rate needs the emulated cluster, which cannot run here: {reason}")
    env = {"LINK_RATE": rate, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    status, output = run_process(["bash", str(EMULATOR), "2", "2", __file__, "--worker", *worker_args], env, timeout)
    print(output, end="", flush=True)
    if status != 0:
        sys.exit(f"the emulated run {'timed out' if status is None else f'failed (exit {status})'}")


def plot(summary, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(summary)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(algos))
    ax.bar([x - 0.2 for x in xs], [summary[a]["fast_steps_per_s_sync"] for a in algos], 0.4, label="synchronous")
    ax.bar([x + 0.2 for x in xs], [summary[a]["fast_steps_per_s_async"] for a in algos], 0.4, label="asynchronous")
    ax.set_xticks(list(xs), [a.upper() for a in algos])
    ax.set_ylabel("fast ranks: steps / s")
    where = f", 2 nodes x 2 ranks at {args.link_rate}" if args.link_rate else ""
    ax.set_title(f"One rank {args.factor}x slower (4 ranks{where})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def worker(args) -> None:
    import horovod.torch as hvd
    import torch
    from torch import nn

    import horovod_leader as hl
    from horovod_leader.training.data import digits, shard
    from horovod_leader.training.models import DigitsCNN
    from horovod_leader.training.clock import AgreedClock, TrainingClock

    topo = hl.init(group_size=4)
    rank, size = topo.rank, topo.size
    train, test = digits()
    mine = shard(train, rank, size)
    period = {"lsgd": 4, "grawa": 8}
    runs = {}
    for algo in ("lsgd", "grawa"):
        for mode in ("sync", "async"):
            torch.manual_seed(0)
            model = DigitsCNN()
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            asynchronous = mode == "async"
            if algo == "lsgd":
                opt = hl.LSGD(sgd, model, period=period[algo], asynchronous=asynchronous)
            else:
                opt = hl.GRAWA(sgd, model, period=period[algo], pull=0.5, asynchronous=asynchronous)
            loader = torch.utils.data.DataLoader(mine, batch_size=32, shuffle=True,
                                                 generator=torch.Generator().manual_seed(rank))
            hvd.allreduce(torch.zeros(1), name=f"bench.start.{algo}.{mode}")  # start together
            start = time.perf_counter()
            clock = TrainingClock()
            agreed = AgreedClock(clock, hvd, asynchronous)
            agreed.start()
            steps, stop = 0, False
            while not stop:
                for x, y in loader:
                    t0 = time.perf_counter()
                    loss = nn.functional.cross_entropy(model(x), y)
                    sgd.zero_grad()
                    loss.backward()
                    if rank == size - 1:  # the straggler: its computation takes `factor` times as long
                        time.sleep((args.factor - 1) * (time.perf_counter() - t0))
                    opt.step(loss)
                    steps += 1
                    stop = agreed.after_step()[0] >= args.budget  # the same step on every rank (sync)
                    if stop:
                        break
            agreed.finish()
            opt.close()  # part of the run: rounds still due after the last step are served here
            elapsed = time.perf_counter() - start
            with torch.no_grad():  # the centre: the workers' average
                for flat in opt.params.values():
                    hvd.allreduce_(flat.flat, op=hvd.Average, name="bench.average")
                accuracy = float((model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
            rates = hvd.allgather(torch.tensor([steps / elapsed]), name="bench.rates").tolist()
            runs[f"{algo}-{mode}"] = {"steps_per_s": rates, "accuracy": accuracy, "period": period[algo]}
            if asynchronous:  # staleness: how far behind the global count each round started
                schedule = opt._schedule
                lag = max((total // schedule.unit - n for n, total, _ in opt.rounds_history), default=0)
                staleness = [lag, schedule.started_during_training, len(opt.rounds_history), schedule.waits,
                             schedule.wait_seconds]
                everyone = hvd.allgather(torch.tensor([staleness], dtype=torch.float64), name="bench.lag").tolist()
                runs[f"{algo}-{mode}"].update({
                    "worst_lag_rounds": max(int(row[0]) for row in everyone),
                    "rounds_started_during_training": [int(row[1]) for row in everyone],
                    "rounds_total": int(everyone[0][2]),
                    "waits_per_rank": [int(row[3]) for row in everyone],
                    "wait_seconds_per_rank": [round(row[4], 3) for row in everyone]})
            if rank == 0:
                print(f"{algo} {mode}: steps/s per rank {[round(r, 1) for r in rates]}, test accuracy {accuracy:.3f}",
                      flush=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps(runs, indent=2))
    hvd.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=20.0, help="wall-clock seconds per configuration")
    parser.add_argument("--factor", type=float, default=3.0, help="how many times slower rank 3 is")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--link-rate", default=None, help="run on an emulated cluster of 2 nodes x 2 ranks with "
                        "links of this rate (tc's syntax, e.g. 1gbit); default: one node over shared memory")
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else launch(args)
