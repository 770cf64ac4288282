"""Benchmark: the fused two-force update against the best unfused PyTorch sequence and a copy.

    python benchmarks/fused_update.py                 # CPU, 1M..64M float32 elements
    python benchmarks/fused_update.py --device cuda   # on a GPU
    python benchmarks/fused_update.py --sizes 1e6 --repeats 3 --out /tmp/b --no-markdown   # tiny run

The update (SGD with momentum and Nesterov, weight decay, two leader pulls) reads x, g, m, L,
G and writes x, m: 7 x 4 bytes per float32 element is its minimal memory traffic. Effective
GB/s = those bytes / time, for both the fused and the unfused version, so their GB/s ratio is
their speed ratio. A plain copy (read n, write n) is the bandwidth limit.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_tables import machine_description, markdown_table, today, update_section  # noqa: E402

from horovod_leader import fused  # noqa: E402

HYPER = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, local_pull=0.1,
             global_pull=0.1)


def unfused_update_(x, g, m, L, G, d, lr, momentum, dampening, weight_decay, nesterov, local_pull, global_pull):
    """The same update with the fewest PyTorch element-wise calls, all in place (d is scratch)."""
    torch.add(g, x, alpha=weight_decay, out=d)            # d = g + wd x
    m.mul_(momentum).add_(d, alpha=1.0 - dampening)       # m = mu m + (1 - damp) d
    if nesterov:
        d.add_(m, alpha=momentum)                         # d = d + mu m
    else:
        d = m
    # x - lr d - a (x - L) - b (x - G) = (1 - a - b) x + a L + b G - lr d, all at the same x
    x.mul_(1.0 - local_pull - global_pull).add_(L, alpha=local_pull).add_(G, alpha=global_pull).add_(d, alpha=-lr)


def verify(device, n=100_003):
    """The two timed versions must compute the same update, or the comparison means nothing."""
    x, g, m, L, G = (torch.randn(n, device=device) for _ in range(5))
    x2, m2, d = x.clone(), m.clone(), torch.empty_like(x)
    fused.two_force_update_(x, g, m, L, G, **HYPER)
    unfused_update_(x2, g, m2, L, G, d, **HYPER)
    if not (torch.allclose(x, x2, rtol=1e-5, atol=1e-6) and torch.allclose(m, m2, rtol=1e-5, atol=1e-6)):
        raise SystemExit("fused and unfused updates disagree: not benchmarking")


def timed(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        times = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="1e6,2e6,4e6,8e6,16e6,32e6,64e6",
                        help="comma-separated element counts (float32)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results", help="folder for JSON and PNG")
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    if fused.backend() != "extension":
        print("warning: the compiled extension is not built; 'fused' below is the PyTorch fallback", file=sys.stderr)
    verify(device)
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        x, g, m, L, G = (torch.randn(n, device=device) for _ in range(5))
        d, src, dst = torch.empty_like(x), torch.randn(n, device=device), torch.empty_like(x)
        t_fused = timed(lambda: fused.two_force_update_(x, g, m, L, G, **HYPER), device, args.repeats)
        t_unfused = timed(lambda: unfused_update_(x, g, m, L, G, d, **HYPER), device, args.repeats)
        t_copy = timed(lambda: dst.copy_(src), device, args.repeats)
        update_bytes, copy_bytes = 7 * 4 * n, 2 * 4 * n
        row = {"elements": n, "fused_s": t_fused, "unfused_s": t_unfused, "copy_s": t_copy,
               "fused_GBps": update_bytes / t_fused / 1e9, "unfused_GBps": update_bytes / t_unfused / 1e9,
               "copy_GBps": copy_bytes / t_copy / 1e9}
        row["speedup"] = t_unfused / t_fused
        row["fraction_of_copy"] = row["fused_GBps"] / row["copy_GBps"]
        rows.append(row)
        print(f"{n:>10,d}  fused {t_fused * 1e3:8.2f} ms {row['fused_GBps']:6.1f} GB/s | unfused {t_unfused * 1e3:8.2f} ms "
              f"{row['unfused_GBps']:6.1f} GB/s | copy {row['copy_GBps']:6.1f} GB/s | speed-up {row['speedup']:.2f}x | "
              f"{100 * row['fraction_of_copy']:.0f}% of copy", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description(args.device)
    tag = "cuda" if device.type == "cuda" else "cpu"
    result = {"benchmark": "fused_update", "device": args.device, "machine": machine, "date": today(),
              "backend": fused.backend(), "command": " ".join(["python"] + sys.argv), "rows": rows}
    (out / f"fused_update_{tag}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / f"fused_update_{tag}.png", machine)
    if not args.no_markdown:
        table = markdown_table(
            ["elements", "fused ms", "fused GB/s", "unfused ms", "unfused GB/s", "copy GB/s", "fused / unfused speed",
             "fused as % of copy"],
            [[f"{r['elements']:,}", f"{r['fused_s'] * 1e3:.2f}", f"{r['fused_GBps']:.1f}", f"{r['unfused_s'] * 1e3:.2f}",
              f"{r['unfused_GBps']:.1f}", f"{r['copy_GBps']:.1f}", f"{r['speedup']:.2f}x",
              f"{100 * r['fraction_of_copy']:.0f}%"] for r in rows])
        update_section(f"fused_update_{tag}",
                       f"Machine: {machine}. Date: {today()}. Backend: {fused.backend()}.\n"
                       f"Command: `{result['command']}`\n\n{table}\n\n"
                       f"Plot: `benchmarks/results/fused_update_{tag}.png`")


def plot(rows, path, machine):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["elements"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("fused_GBps", "fused"), ("unfused_GBps", "unfused PyTorch"), ("copy_GBps", "copy (limit)")):
        ax.plot(sizes, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("elements (float32)")
    ax.set_ylabel("effective GB/s")
    ax.set_title(f"Two-force update\n{machine}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
