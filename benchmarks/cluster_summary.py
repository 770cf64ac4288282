"""The cluster benchmark's figures: one run's summary, the per-rate tables, the targets, the plot.

Definitions (P is the model's float32 parameter payload):

* accuracy: the centre, every method's headline as the authors report it
  (``horovod_leader.report``'s ``curve_of``): the workers' average with batch norm
  re-estimated (LSGD, GRAWA, local SGD, data-parallel SGD), EASGD's centre variable,
  DiLoCo's outer parameters; asynchronous runs measure it on rank 0 between rounds (a
  snapshot taken at a round). LSGD's final leader accuracy is kept beside it;
* accuracy at the budget: the test-accuracy curve, linear between evaluations, read at the
  budget. Every run stops within a step of its budget (the clock is agreed at every step);
  ``training s at the end`` shows it;
* target at a rate: the mean over seeds of data-parallel SGD's accuracy at the budget;
  a run's time to target is where its curve (linear between evaluations) first reaches the
  target, counted only within the budget;
* steps/s: steps (mean over ranks) over the final training time; ``of comm-free``: its share
  of the communication-free run's steps/s (``nocomm``) at the same rate, mean over seeds;
* comm bytes/step/worker: each rank's ``comm_bytes`` (and one-sided window bytes) over its
  steps, mean over ranks;
* link bytes/step: bytes the nodes sent through their links while the training clock ran
  (Ethernet level, headers and acknowledgements included), summed over nodes, per step.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Dict, List, Optional

from mpi_launch import REPO

NAMES = {"lsgd": "LSGD (multi-leader)", "mgrawa": "MGRAWA", "easgd": "EASGD", "localsgd": "local SGD",
         "dp": "data-parallel SGD", "lsgd-async": "LSGD async", "diloco": "DiLoCo", "lsgd-bf16": "LSGD bf16",
         "lsgd-int8": "LSGD int8", "lsgd-tauG64": "LSGD tau=16, tau_G=64", "mgrawa-bf16": "MGRAWA bf16",
         "mgrawa-int8": "MGRAWA int8", "lgrawa": "LGRAWA", "mgrawa-async": "MGRAWA async",
         "easgd-async": "EASGD async", "nocomm": "communication-free (local SGD, no round)",
         "torch-localsgd": "PyTorch PostLocalSGD, PeriodicModelAverager", "torch-hierarchical":
         "PyTorch PostLocalSGD, HierarchicalModelAverager", "torchft-diloco": "torchft DiLoCo",
         "torchft-localsgd": "torchft LocalSGD", "horovod-dp": "Horovod DistributedOptimizer"}

# (the toolkit's method, its peer, the speed target: the toolkit at least this fast); ``@torch``:
# the toolkit on its torch engine, on the peers' own runtime (torch.distributed over Gloo)
PEER_PAIRS = [("localsgd", "torch-localsgd", 1.0), ("localsgd", "torch-hierarchical", None),
              ("localsgd", "torchft-localsgd", None), ("diloco", "torchft-diloco", 1.0), ("dp", "horovod-dp", None),
              ("localsgd@torch", "torch-localsgd", 1.0), ("diloco@torch", "torchft-diloco", 1.0)]


def summarise_run(folder: Path, link_dir: Path, payload: int) -> Dict:
    """Curve, final figures and byte counts of one finished training run."""
    from horovod_leader.training.report import curve, load_run

    run = load_run(folder)
    records, config = run["records"], run["config"]
    last = records[-1]
    steps = last.get("steps") or [last["step"]]
    per_rank = lambda key: (last.get(key) if isinstance(last.get(key), list) else [last.get(key) or 0] * len(steps))
    comm = [c + o for c, o in zip(per_rank("comm_bytes"), per_rank("one_sided_bytes"))]
    mean_steps = sum(steps) / len(steps)
    points = curve(run)
    links = {}
    for path in sorted(link_dir.glob("*.json")) if link_dir.is_dir() else []:
        links[path.stem] = json.loads(path.read_text())
    summary = {
        "curve": points, "curve_of": run["model"], "final_accuracy": points[-1][1] if points else None,
        "metric": run["metric"].name, "higher_is_better": run["metric"].higher_is_better,
        "final_leader_accuracy": last.get("leader_accuracy"), "final_centre_accuracy": last.get("centre_accuracy"),
        "train_seconds": last["train_seconds"],
        "wall_seconds": last["wall_seconds"], "steps": mean_steps,
        "steps_per_s": mean_steps / last["train_seconds"] if last["train_seconds"] > 0 else None,
        "comm_bytes_per_step": statistics.mean(c / max(s, 1) for c, s in zip(comm, steps)),
        "parameter_bytes": payload, "link_counters": links or None,
        "periods": {key: config.get(key) for key in ("period", "global_period", "overlap")},
        "compression": config.get("compression"),
    }
    if config.get("algo") == "lsgd" and not config.get("asynchronous") and config.get("global_period"):
        summary["global_refreshes"] = int(min(steps)) // int(config["global_period"])
    if links:
        summary["link_sent_train"] = sum(n["train"]["tx"] for n in links.values())
        summary["link_sent_per_step"] = summary["link_sent_train"] / max(mean_steps, 1)
        summary["link_received_per_step"] = sum(n["train"]["rx"] for n in links.values()) / max(mean_steps, 1)
        summary["link_sent_whole_run"] = sum(n["whole"]["tx"] for n in links.values())
    return summary


# ---------------------------------------------------------------------------- aggregation
def mean_sd(values: List[float], scale: float = 1.0, spec: str = ".2f") -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def score_text(values: List[float], scale: float) -> str:
    """Accuracies (``scale`` 100) as percentages, losses (``scale`` 1) as bits per byte."""
    return f"{mean_sd(values, 100)}%" if scale == 100 else f"{mean_sd(values, spec='.3f')} bits/byte"


def mean_or_none(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def accuracy_at(curve, budget: float) -> Optional[float]:
    """The curve, linear between evaluations, at ``budget`` (its last point if it ends sooner)."""
    before = [(t, a) for t, a in curve if t <= budget]
    after = [(t, a) for t, a in curve if t > budget]
    if not before:
        return None
    if not after:
        return before[-1][1]
    (t0, a0), (t1, a1) = before[-1], after[0]
    return a0 + (a1 - a0) * (budget - t0) / (t1 - t0)


def time_to(curve, target: float, budget: float, higher: bool = True) -> Optional[float]:
    """Training time at which the curve, linear between evaluations, first reaches ``target``
    (at or above it; ``higher`` False, a loss: at or below it); None if not within ``budget``."""
    previous = None
    for t, a in curve:
        if (a >= target) if higher else (a <= target):
            if previous is None or a == previous[1]:
                reached = t
            else:
                reached = previous[0] + (target - previous[1]) / (a - previous[1]) * (t - previous[0])
            # a curve reaches its own value at the budget exactly there: allow rounding
            return reached if reached <= budget * (1 + 1e-9) else None
        previous = (t, a)
    return None


def accuracy_at_steps(run: Dict, steps: float) -> Optional[float]:
    """The run's curve at ``steps`` steps, reading its training clock at its mean step rate
    (the rate is steady once a run has started, and the curve is indexed by time only)."""
    return accuracy_at(run["curve"], steps / run["steps_per_s"]) if run.get("steps_per_s") else None


def equal_steps_change(plain_runs: List[Dict], packed_runs: List[Dict]):
    """(change in points, steps): mean accuracy of ``packed_runs`` minus that of ``plain_runs``,
    both read at the fewest steps any of these runs took, or None."""
    steps = min(r["steps"] for r in plain_runs + packed_runs)
    plain = [a for a in (accuracy_at_steps(r, steps) for r in plain_runs) if a is not None]
    packed = [a for a in (accuracy_at_steps(r, steps) for r in packed_runs) if a is not None]
    if not plain or not packed:
        return None
    return 100 * (statistics.mean(packed) - statistics.mean(plain)), steps


def method_key(run: Dict) -> str:
    """The row a run belongs to: its method, marked ``@torch`` on the torch engine."""
    engine = run.get("engine", "horovod")
    return run["method"] if engine == "horovod" else f"{run['method']}@{engine}"


def name_of(key: str) -> str:
    """A row's name in tables and plots: ``mgrawa-ov2@torch`` is "MGRAWA, overlap d = 2 [torch engine]"."""
    method, _, engine = key.partition("@")
    base, _, delay = method.rpartition("-ov")
    if base and delay.isdigit():
        name = f"{NAMES.get(base, base)}, overlap d = {delay}"
    else:
        name = NAMES.get(method, method)
    return name + (f" [{engine} engine]" if engine else "")


def aggregate(results: List[Dict]) -> Dict:
    """{(shape, rate): {"target": ..., "methods": {method: row}}} over the successful runs."""
    cells: Dict = {}
    for r in results:
        if r["status"] == "ok" and "metric" not in r:  # runs summarised before the metric was recorded
            r["metric"], r["higher_is_better"] = "accuracy", True
        cell = cells.setdefault((r["shape"], r["rate"]), {"runs": {}, "failed": {}})
        bucket = cell["runs"] if r["status"] == "ok" else cell["failed"]
        bucket.setdefault(method_key(r), []).append(r)
    for cell in cells.values():
        first = next((r for runs in cell["runs"].values() for r in runs), {})
        cell["metric"], cell["scale"] = first.get("metric", "accuracy"), 100 if first.get("higher_is_better", True) else 1
        dp = cell["runs"].get("dp", [])
        cell["target"] = mean_or_none(accuracy_at(r["curve"], r["budget"]) for r in dp)
        cell["methods"] = {}
        for method, runs in cell["runs"].items():
            times = ([time_to(r["curve"], cell["target"], r["budget"], r.get("higher_is_better", True)) for r in runs]
                     if cell["target"] is not None else [])
            cell["methods"][method] = {
                "runs": len(runs), "final_accuracy": [r["final_accuracy"] for r in runs],
                "accuracy_at_budget": [accuracy_at(r["curve"], r["budget"]) for r in runs],
                "train_seconds": [r["train_seconds"] for r in runs], "time_to_target": times,
                "reached": sum(t is not None for t in times), "steps_per_s": [r["steps_per_s"] for r in runs],
                "comm_bytes_per_step": [r["comm_bytes_per_step"] for r in runs],
                "link_sent_per_step": [r.get("link_sent_per_step") for r in runs],
                "link_sent_per_refresh": [r["link_sent_train"] / r["global_refreshes"] for r in runs
                                          if r.get("global_refreshes") and r.get("link_sent_train") is not None],
                "link_sent_whole_run": [r.get("link_sent_whole_run") for r in runs],
                "periods": runs[0]["periods"], "payload": runs[0]["parameter_bytes"]}
    return cells


def periods_text(method: str, periods: Dict) -> str:
    if method.startswith(("dp", "horovod-dp")):
        return "every step"
    overlap = f", d={periods['overlap']}" if periods.get("overlap") else ""
    if periods.get("global_period") and method.startswith("lsgd"):
        return f"tau={periods['period']} in a node, tau_G={periods['global_period']}{overlap}"
    if periods.get("global_period") not in (None, periods.get("period")):  # a hierarchical averager
        return f"tau={periods['period']} in a node, {periods['global_period']} across{overlap}"
    return f"tau={periods.get('period')}{overlap}"


# ---------------------------------------------------------------------------- tables
def rate_table(cell: Dict) -> str:
    from report_tables import markdown_table

    dp_time = mean_or_none(cell["methods"].get("dp", {}).get("time_to_target", []))
    limit = mean_or_none(cell["methods"].get("nocomm", {}).get("steps_per_s", []))
    rows = []
    for method, row in cell["methods"].items():
        rate = mean_or_none(row["steps_per_s"])
        share = "-" if not limit or rate is None else f"{100 * rate / limit:.0f}%"
        mean_time = mean_or_none(row["time_to_target"])
        ratio = "-" if mean_time is None or not dp_time else f"{mean_time / dp_time:.2f}x"
        payload = row["payload"]
        link = [v / payload for v in row["link_sent_per_step"] if v is not None]
        rows.append([name_of(method), periods_text(method, row["periods"]),
                     mean_sd(row["accuracy_at_budget"], cell["scale"]), mean_sd(row["train_seconds"], spec=".1f"),
                     f"{mean_sd(row['time_to_target'], spec='.1f')} ({row['reached']}/{row['runs']})", ratio,
                     mean_sd(row["steps_per_s"], spec=".2f"), share,
                     f"{mean_or_none(row['comm_bytes_per_step']) / 1e6:.2f} MB "
                     f"({mean_or_none(row['comm_bytes_per_step']) / payload:.4f} P)",
                     f"{statistics.mean(link):.4f} P" if link else "-"])
    what = "test acc. % at the budget" if cell["scale"] == 100 else "validation bits/byte at the budget"
    return markdown_table(["method", "periods", what, "training s at the end",
                           "s to target (runs reaching)",
                           "time vs DP", "steps/s", "of comm-free", "comm_bytes/step/worker",
                           "link bytes/step, all nodes sent"],
                          rows)


def emulator_tax_lines(cells: Dict, shape: str) -> List[str]:
    """The communication-free run on the emulated cluster against the same run over shared
    memory: what the emulator costs the computation, where nothing is sent (target: within 5%)."""
    shm = mean_or_none(cells.get((shape, "shm"), {}).get("methods", {}).get("nocomm", {}).get("steps_per_s", []))
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        emulated = mean_or_none(cell["methods"].get("nocomm", {}).get("steps_per_s", []))
        if cell_shape != shape or rate == "shm" or not shm or emulated is None:
            continue
        change = 100 * (emulated / shm - 1)
        lines.append(f"- {rate}: the communication-free run made {emulated:.2f} steps/s on the emulated cluster "
                     f"against {shm:.2f} over shared memory ({change:+.1f}%; target: within 5%): "
                     f"**{'met' if abs(change) <= 5 else 'not met'}**.")
    return lines


def target_lines(cells: Dict, shape: str) -> List[str]:
    """The targets, computed from the runs: met or not, with the figures. Mean times are over
    the runs that reach the target (their count is given)."""
    lines = emulator_tax_lines(cells, shape)
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        if cell_shape != shape or cell["target"] is None or cell.get("metric") == "bits_per_byte":
            continue  # the language model's targets: ``language_model_lines``
        m = cell["methods"]
        time_of = lambda method: mean_or_none(m.get(method, {}).get("time_to_target", []))
        acc_of = lambda method: mean_or_none(m.get(method, {}).get("accuracy_at_budget", []))
        reached = lambda method: f"{m[method]['reached']}/{m[method]['runs']}"
        times = lambda method: f"{mean_sd(m[method]['time_to_target'], spec='.1f')} s ({reached(method)})"
        lsgd, dp, easgd = time_of("lsgd"), time_of("dp"), time_of("easgd")
        if "lsgd" in m and dp and acc_of("lsgd") is not None:
            ratio = None if lsgd is None else lsgd / dp
            drop = 100 * (acc_of("dp") - acc_of("lsgd"))
            met = ratio is not None and ratio <= 0.5 and drop <= 0.5
            lines.append(f"- {rate}: LSGD reaches the target in {times('lsgd')}, data-parallel SGD in {times('dp')}: "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'}; accuracy at the budget "
                         f"{acc_of('lsgd') * 100:.2f}% against {acc_of('dp') * 100:.2f}% (target: at most 0.5x "
                         f"the time, at most 0.5 points lower): **{'met' if met else 'not met'}**.")
        if all(k in m for k in ("lsgd", "easgd", "dp")):
            holds = None not in (lsgd, easgd, dp) and lsgd <= easgd <= dp
            lines.append(f"- {rate}: times to target LSGD {times('lsgd')}, EASGD {times('easgd')}, data-parallel "
                         f"SGD {times('dp')}: the papers' ordering LSGD <= EASGD <= DP "
                         f"**{'holds' if holds else 'does not hold'}** on the means.")
        row = m.get("lsgd")
        link = [v for v in (row or {}).get("link_sent_per_step", []) if v is not None]
        if row and link and row["periods"].get("global_period"):
            one_payload = row["payload"] / row["periods"]["global_period"]
            per_refresh = [v / row["payload"] for v in row["link_sent_per_refresh"]]
            met = per_refresh and 1.0 <= statistics.mean(per_refresh) <= 1.05
            lines.append(f"- {rate}: multi-leader LSGD sent {statistics.mean(link) / 1e6:.3f} MB per step across the "
                         f"links (all nodes, training clock): {statistics.mean(link) / one_payload:.2f}x one payload "
                         f"per tau_G steps ({one_payload / 1e6:.3f} MB)"
                         + (f", {mean_sd(per_refresh)} payloads per global refresh (target 1.00-1.05: "
                            f"**{'met' if met else 'not met'}**)" if per_refresh else "")
                         + f"; its comm_bytes count {mean_or_none(row['comm_bytes_per_step']) / 1e6:.3f} MB per "
                         "step per worker, the exchanges inside the nodes (every tau steps) included.")
    return lines


#: overlapped rounds' speed targets: the share of the communication-free steps/s, by link rate
OVERLAP_SHARE = {"100mbit": 0.85, "1gbit": 0.95}


def share_of_limit(m: Dict, method: str) -> Optional[float]:
    limit, rate = mean_or_none(m.get("nocomm", {}).get("steps_per_s", [])), mean_or_none(m[method]["steps_per_s"])
    return rate / limit if limit and rate else None


def overlap_lines(cells: Dict, shape: str) -> List[str]:
    """Overlapped rounds (``-ovD``) against the same method without: the share of the
    communication-free rate (target by rate, ``OVERLAP_SHARE``), the smallest delay d that
    reaches it, and the accuracy at equal steps against the method without overlap (target:
    within 0.5 points)."""
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        m = cell["methods"]
        if cell_shape != shape or "nocomm" not in m:
            continue
        goal = OVERLAP_SHARE.get(rate)
        for base in ("lsgd", "mgrawa", "localsgd", "diloco", "easgd"):
            variants = sorted((int(k.rsplit("-ov", 1)[1]), k) for k in m if k.startswith(base + "-ov"))
            if base not in m or not variants:
                continue
            parts, reaching = [], None
            for d, name in variants:
                share = share_of_limit(m, name)
                change = equal_steps_change(cell["runs"][base], cell["runs"][name])
                parts.append(f"d={d}: {'-' if share is None else f'{100 * share:.0f}%'}"
                             + ("" if change is None else f", {change[0]:+.2f} points at {change[1]:.0f} steps"))
                if reaching is None and goal is not None and share is not None and share >= goal:
                    reaching = (d, change)
            base_share = share_of_limit(m, base)
            line = (f"- {rate}: {name_of(base)} runs at {'-' if base_share is None else f'{100 * base_share:.0f}%'}"
                    f" of the communication-free rate without overlap; " + "; ".join(parts))
            if goal is not None:
                line += f" (target: at least {100 * goal:.0f}%: **{'met' if reaching else 'not met'}**"
                if reaching:
                    close = reaching[1] is not None and abs(reaching[1][0]) <= 0.5
                    line += (f"; at d={reaching[0]}, the smallest that reaches it, accuracy at equal steps within 0.5 "
                             f"points: **{'met' if close else 'not met'}**")
                line += ")"
            lines.append(line + ".")
    return lines


def compressed_link_lines(cells: Dict, shape: str) -> List[str]:
    """Compressed MGRAWA's link bytes against uncompressed (targets: int8 at most 0.3x, bf16 at most 0.55x)."""
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        m = cell["methods"]
        if cell_shape != shape or rate == "shm" or "mgrawa" not in m:
            continue
        plain = mean_or_none(m["mgrawa"]["link_sent_per_step"])
        for kind, goal in (("bf16", 0.55), ("int8", 0.3)):
            packed = mean_or_none(m.get(f"mgrawa-{kind}", {}).get("link_sent_per_step", []))
            if plain and packed:
                ratio = packed / plain
                lines.append(f"- {rate}: MGRAWA {kind} sent {ratio:.3f}x the link bytes of uncompressed MGRAWA "
                             f"(target: at most {goal}x): **{'met' if ratio <= goal else 'not met'}**.")
    return lines


def language_model_lines(cells: Dict, shape: str) -> List[str]:
    """The language model's targets: the best periodic method reaches data-parallel SGD's
    validation loss at the budget in at most 0.5x its time (at 100 Mbit/s), and every method's
    share of the communication-free rate."""
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        m = cell["methods"]
        if cell_shape != shape or cell.get("metric") != "bits_per_byte" or cell["target"] is None:
            continue
        dp = mean_or_none(m.get("dp", {}).get("time_to_target", []))
        periodic = {k: mean_or_none(v["time_to_target"]) for k, v in m.items()
                    if k.partition("@")[0] not in ("dp", "nocomm", "horovod-dp")}
        reached = {k: t for k, t in periodic.items() if t is not None}
        if reached and dp:
            best = min(reached, key=reached.get)
            ratio = reached[best] / dp
            line = (f"- {rate}: the best periodic method, {name_of(best)}, reaches data-parallel SGD's "
                    f"{cell['target']:.3f} bits/byte in {reached[best]:.1f} s against {dp:.1f} s ({ratio:.2f}x)")
            if rate == "100mbit":
                line += f" (target: at most 0.5x): **{'met' if ratio <= 0.5 else 'not met'}**"
            lines.append(line + ".")
        shares = {k: share_of_limit(m, k) for k in m if k != "nocomm"}
        listed = ", ".join(f"{name_of(k)} {100 * v:.0f}%" for k, v in shares.items() if v is not None)
        if listed:
            low = [k for k, v in shares.items() if v is not None and v < 0.85]
            lines.append(f"- {rate}: share of the communication-free rate: {listed}"
                         + (f" (target at 100mbit: every method at least 85%: **{'met' if not low else 'not met'}**)"
                            if rate == "100mbit" else "") + ".")
    return lines


def engine_lines(cells: Dict, shape: str) -> List[str]:
    """Each method on the torch engine against the same on Horovod's, where both ran: steps/s
    (a ratio within one grid) and accuracy at the budget."""
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        m = cell["methods"]
        if cell_shape != shape:
            continue
        for key in [k for k in m if k.endswith("@torch")]:
            base = key.partition("@")[0]
            if base not in m:
                continue
            fast, other = mean_or_none(m[key]["steps_per_s"]), mean_or_none(m[base]["steps_per_s"])
            ratio = f" ({fast / other:.2f}x)" if fast and other else ""
            lines.append(f"- {rate}: {name_of(base)} on the torch engine {mean_sd(m[key]['steps_per_s'])} steps/s "
                         f"against {mean_sd(m[base]['steps_per_s'])} on Horovod's{ratio}; accuracy at the budget "
                         f"{mean_sd(m[key]['accuracy_at_budget'], cell['scale'])} against "
                         f"{mean_sd(m[base]['accuracy_at_budget'], cell['scale'])}.")
    return lines


def versus(name: str, row: Dict, other_name: str, other: Dict, scale: float = 100) -> str:
    """One method against another: accuracy (or loss) at the budget, time to target, link bytes."""
    def link(r):
        return mean_sd(r["link_sent_per_step"], 1 / r["payload"], ".4f")

    return (f"{name} against {other_name}: at the budget {score_text(row['accuracy_at_budget'], scale)} "
            f"against {score_text(other['accuracy_at_budget'], scale)}, time to target "
            f"{mean_sd(row['time_to_target'], spec='.1f')} s ({row['reached']}/{row['runs']}) against "
            f"{mean_sd(other['time_to_target'], spec='.1f')} s ({other['reached']}/{other['runs']}), "
            f"link bytes per step (all nodes sent) {link(row)} P against {link(other)} P")


def peer_lines(cells: Dict, shape: str) -> List[str]:
    """Each of the toolkit's methods against its peer, where both ran: steps/s (a ratio within
    one grid, both measured alike) and accuracy at the budget, over the seeds."""
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        m = cell["methods"]
        if cell_shape != shape:
            continue
        for mine, peer, target in PEER_PAIRS:
            if mine not in m or peer not in m:
                continue
            fast, slow = mean_or_none(m[mine]["steps_per_s"]), mean_or_none(m[peer]["steps_per_s"])
            ratio = fast / slow if fast and slow else None
            line = (f"- {rate}: {name_of(mine)} {mean_sd(m[mine]['steps_per_s'])} steps/s against "
                    f"{name_of(peer)} {mean_sd(m[peer]['steps_per_s'])}"
                    + (f" ({ratio:.2f}x)" if ratio else "")
                    + f"; at the budget {score_text(m[mine]['accuracy_at_budget'], cell['scale'])} against "
                    f"{score_text(m[peer]['accuracy_at_budget'], cell['scale'])}")
            if target is not None and ratio is not None:
                line += f" (target: at least {target:.1f}x as fast): **{'met' if ratio >= target else 'not met'}**"
            lines.append(line + ".")
    return lines


def compression_lines(cells: Dict, shape: str) -> List[str]:
    """Compressed exchanges against uncompressed ones, and DiLoCo against LSGD, where run."""
    lines = []
    for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
        m = cell["methods"]
        if cell_shape != shape:
            continue
        for base in ("lsgd", "mgrawa"):
            for kind in ("bf16", "int8"):
                variant = f"{base}-{kind}"
                if base not in m or variant not in m:
                    continue
                plain = [a for a in m[base]["accuracy_at_budget"] if a is not None]
                packed = [a for a in m[variant]["accuracy_at_budget"] if a is not None]
                if not plain or not packed:
                    continue
                change = 100 * (statistics.mean(packed) - statistics.mean(plain))
                spread = f"seeds' spread {mean_sd(plain, 100)} and {mean_sd(packed, 100)}"
                line = (f"- {rate}: {NAMES[variant]} changes the accuracy at the budget by {change:+.2f} points "
                        f"({spread}; target: at most 0.3): **{'met' if abs(change) <= 0.3 else 'not met'}**")
                at_steps = equal_steps_change(cell["runs"][base], cell["runs"][variant])
                if at_steps is not None:
                    # The budget is time: a cheaper exchange also buys steps. This separates the two.
                    line += f"; at equal steps ({at_steps[1]:.0f}, the fewest any of these runs took) {at_steps[0]:+.2f}"
                plain_time, packed_time = (mean_or_none(m[k]["time_to_target"]) for k in (base, variant))
                if plain_time and packed_time:
                    line += f"; time to target {plain_time / packed_time:.2f}x sooner than uncompressed"
                    if base == "lsgd" and kind == "int8" and rate == "100mbit":
                        met = plain_time >= 1.5 * packed_time
                        line += f" (target at 100mbit: at least 1.5x): **{'met' if met else 'not met'}**"
                lines.append(line + ".")
        if "lsgd-int8" in m and "lsgd-tauG64" in m:
            lines.append(f"- {rate}: at about equal link bytes, "
                         + versus("lsgd-int8", m["lsgd-int8"], "lsgd-tauG64 (uncompressed)", m["lsgd-tauG64"], cell["scale"]) + ".")
        if "diloco" in m and "lsgd" in m:
            lines.append(f"- {rate}: " + versus("diloco", m["diloco"], "lsgd", m["lsgd"], cell["scale"]) + ".")
    return lines


# ---------------------------------------------------------------------------- plot
def plot(results: List[Dict], cells: Dict, shape: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    rates = sorted({r["rate"] for r in results if r["shape"] == shape}, key=rate_order)
    methods = list(dict.fromkeys(method_key(r) for r in results))
    loss = any(r.get("higher_is_better") is False for r in results)  # the language model: bits per byte
    value = (lambda a: a) if loss else (lambda a: max(100 * (1 - a), 1e-2))
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), sharey=True, squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for i, method in enumerate(methods):
            runs = [r for r in results if r["shape"] == shape and r["rate"] == rate and method_key(r) == method
                    and r["status"] == "ok"]
            for j, r in enumerate(runs):
                ax.plot([t for t, _ in r["curve"]], [value(a) for _, a in r["curve"]], marker=".",
                        ms=3, color=f"C{i % 10}", lw=1, alpha=0.8, label=name_of(method) if j == 0 else None)
        ax.axvline(results[0]["budget"], color="grey", lw=0.8, ls=":", label="budget")
        target = cells.get((shape, rate), {}).get("target")
        if target is not None:
            ax.axhline(value(target), color="k", lw=0.8, ls="--", label="target (DP's mean at the budget)")
        if not loss:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_title(where(shape, rate), fontsize=10)
        ax.set_xlabel("training time (s), evaluation excluded")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("validation bits per byte" if loss else "test error (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(("Byte-level GPT: validation bits per byte" if loss else "MNIST-1D: test error")
                 + " against training time, one line per seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def where(shape: str, rate: str) -> str:
    nodes, _, ranks = shape.partition("x")
    if rate == "shm":
        return f"1 node of {int(nodes) * int(ranks)} ranks (groups of {ranks}), shared memory only"
    return f"{nodes} nodes x {ranks} ranks, links of {rate}"


def rate_order(rate: str):
    if rate == "shm":
        return math.inf
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit):
            try:
                return float(rate[: -len(unit)]) * scale
            except ValueError:
                break
    return 0.0


# ---------------------------------------------------------------------------- outputs
def write_outputs(args, results: List[Dict], skipped: Dict[str, str], out: Path, command: str) -> None:
    from report_tables import git_revision, machine_description, today, update_section

    cells = aggregate(results)
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    stem = args.section  # "cluster" for the core grid; another section keeps its own files beside it
    plots = {}
    for shape in shapes:
        plots[shape] = out / (f"{stem}.png" if shape == shapes[0] else f"{stem}-{shape}.png")
        plot(results, cells, shape, plots[shape])
    machine = machine_description()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (out / f"{stem}.json").write_text(json.dumps(
        {"benchmark": stem, "machine": machine, "date": today(), "revision": git_revision(),
         "command": command, "settings": settings, "skipped": skipped, "runs": results}, indent=1))
    sections = []
    for shape in shapes:
        for (cell_shape, rate), cell in sorted(cells.items(), key=lambda kv: rate_order(kv[0][1])):
            if cell_shape != shape:
                continue
            target = score_text([cell["target"]], cell["scale"]) if cell["target"] is not None else (
                "none: no data-parallel SGD evaluation within the budget" if "dp" in cell["runs"] else
                "none: no data-parallel SGD run")
            failed = "; ".join(f"{name_of(m)}: {len(rs)} run(s) {rs[0]['status']}" for m, rs in
                               cell["failed"].items())
            sections.append(f"**{where(shape, rate)}** (target: {target})"
                            + (f". Failed: {failed}" if failed else "") + "\n\n" + rate_table(cell))
        lines = (target_lines(cells, shape) + overlap_lines(cells, shape) + compression_lines(cells, shape)
                 + compressed_link_lines(cells, shape) + peer_lines(cells, shape) + language_model_lines(cells, shape)
                 + engine_lines(cells, shape))
        sections.append("Targets, computed from the runs above:\n\n" + "\n".join(lines or ["- (no run with a target)"]))
    print("\n\n".join(sections))
    for shape, path in plots.items():
        print(f"plot: {path}")
    if args.no_markdown:
        return
    payload = results[0].get("parameter_bytes") or args.parameter_bytes
    header = (f"Machine: {machine}. Date: {today()}. Revision: {git_revision()}.\nCommand: `{command}`\n\n"
              + (f"MNIST-1D, `--model {args.model}` (P = {payload:,} bytes of float32 parameters), `--preset paper`, "
                 if getattr(args, "task", "mnist1d") == "mnist1d" else
                 f"The byte-level GPT on the Python standard library's sources (P = {payload:,} bytes of float32 "
                 "parameters), AdamW inside every method (lr 0.001, weight decay 0.01, batch 16 windows of 128 "
                 "bytes per worker), validation bits per byte of the centre, ")
              + f"{args.budget:g} s of training per run (training clock), seeds {args.seeds}. Every byte column is "
              "per step; P is one parameter payload.")
    not_run = "".join(f"\n\nNot run: {name_of(m)} ({why})." for m, why in skipped.items())
    plot_lines = "\n".join(f"Plot: `{os.path.relpath(p, REPO)}`" for p in plots.values())
    update_section(args.section, header + "\n\n" + "\n\n".join(sections) + not_run + "\n\n" + plot_lines)
