"""Benchmark: the compressed exchanges' codecs in one pass against the PyTorch reference and a copy.

    python benchmarks/codec.py                                   # CPU, 1M..64M float32 values
    python benchmarks/codec.py --sizes 1e6 --repeats 3 --no-markdown   # a tiny run

``encode_diff``: the difference from the reference and the encoding (read x and r; write the
payload); ``decode_into``: the decoding and the add-back (read the payload and r; write out).
GB/s counts that minimal traffic, for the one-pass kernel and for the reference alike, so their
GB/s ratio is their speed ratio; a copy (read n, write n float32) is the bandwidth limit.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_tables import machine_description, markdown_table, today, update_section  # noqa: E402

from horovod_leader import fused  # noqa: E402
from horovod_leader.compression import Compression  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traffic(codec, n: int, operation: str) -> int:
    payload = codec.payload_bytes(n)
    return 8 * n + payload if operation == "encode" else payload + 8 * n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,4e6,16e6,64e6")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    if fused._ext is None or not hasattr(fused._ext, "encode_int8"):
        raise SystemExit("the compiled extension is not built: nothing to compare the reference with")
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        x, ref = torch.randn(n), torch.randn(n)
        out, copy_out = torch.empty(n), torch.empty(n)
        copy = timed(lambda: copy_out.copy_(x), args.repeats)
        copy_gbs = 8 * n / copy / 1e9
        for codec in (Compression.bf16, Compression.int8):
            payload = codec.encode_diff(x, ref)
            for operation, fast, plain in (
                    ("encode", lambda: codec.encode_diff(x, ref), lambda: codec.encode_diff_reference(x, ref)),
                    ("decode", lambda: codec.decode_into(payload, out, ref),
                     lambda: codec.decode_into_reference(payload, out, ref))):
                t_fast, t_plain = timed(fast, args.repeats), timed(plain, args.repeats)
                bytes_ = traffic(codec, n, operation)
                fast_gbs, plain_gbs = bytes_ / t_fast / 1e9, bytes_ / t_plain / 1e9
                rows.append([f"{n:,}", codec.name, operation, f"{t_fast * 1e3:.2f}", f"{fast_gbs:.1f}",
                             f"{t_plain * 1e3:.2f}", f"{plain_gbs:.1f}", f"{copy_gbs:.1f}",
                             f"{t_plain / t_fast:.2f}x", f"{100 * fast_gbs / copy_gbs:.0f}%"])
                print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["values", "codec", "operation", "one pass ms", "one pass GB/s", "reference ms",
                            "reference GB/s", "copy GB/s", "one pass / reference speed", "one pass as % of copy"],
                           rows)
    print(table)
    if not args.no_markdown:
        update_section("codec_cpu", f"Machine: {machine_description()}. Date: {today()}.\n"
                       f"Command: `python benchmarks/codec.py`; median of {args.repeats} runs each.\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
