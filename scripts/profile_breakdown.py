#!/usr/bin/env python3
"""Per-op time breakdown of a criterion bench from a `perf` profile.

Samples the bench binary with `perf record` while criterion runs one benchmark in profile mode
(no analysis), attributes each sample's symbol to an op category (matmul kernels, elementwise
and broadcast ops, layout copies, activations, norms and softmax, reductions, allocation and
page faults, autodiff bookkeeping, ...) and prints the share of each category and, given the
bench's time per iteration, milliseconds per iteration.

    python3 scripts/profile_breakdown.py BENCH_BINARY FILTER --ms-per-iter 130 [--secs 15]
        [--label before] [--json out.json]

BENCH_BINARY is a criterion bench executable (target/release/deps/forward-<hash>, built by
`cargo bench --no-run`). The model setup (writing and loading the random checkpoint) is left
out: the first `--skip-ms` milliseconds are not sampled, the first quarter of the samples is
dropped, and the symbols of file writing are ignored. Needs `perf` (linux-perf).
"""
import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile

# Symbols of the bench's setup (writing and loading the random checkpoint), left out.
SETUP = r"copy_folio|write_safetensors|weights::encode|filemap|ext4|xfs|iomap|file_write|generic_perform_write"

# (category, regex over the symbol name); first match wins.
CATEGORIES = [
    ("matmul (gemm kernels)", r"gemm|faer|nano_gemm|microkernel|matmul"),
    ("layout copies", r"to_contiguous|copy_contiguous|memmove|memcpy|StridedBlocks|permute|reshape"),
    ("elementwise / broadcast", r"StridedIter|binary_op|scalar_op|unary_op|mask_fill|mask_where|broadcast|expand|map_elems|clamp|powf|powi"),
    ("activations (erf, exp, tanh)", r"erf|expf|__exp|tanh|sigmoid|gelu|silu|flex::activation\b|ops::flex::derivative"),
    ("norms and softmax", r"layer_norm|rms|softmax|map_rows|mean_rstd|for_row_chunks|log_softmax"),
    ("reductions", r"reduce|sum_dim|mean_dim|max_dim|argmax|column_sums|sum_partials"),
    ("gather / select / embedding", r"select|gather|scatter|embedding|index|slice|cat|stack"),
    ("allocation, zeroing, page faults", r"malloc|free|memset|clear_page|page_fault|alloc|mmap|munmap|brk|_int_|cfree|zero"),
    ("autodiff graph and bookkeeping", r"burn_autodiff|Mutex|LocalKey|Arc|spin|futex|Node|Graph|Checkpoint"),
    ("threads (rayon, scheduling)", r"rayon|crossbeam|sched|yield|park|wake"),
]


def categorize(symbol):
    for name, pattern in CATEGORIES:
        if re.search(pattern, symbol, re.IGNORECASE):
            return name
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("filter")
    ap.add_argument("--ms-per-iter", type=float, default=None)
    ap.add_argument("--secs", type=int, default=15)
    ap.add_argument("--skip-ms", type=int, default=5000)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    ap.add_argument("--top", type=int, default=12, help="also list this many hottest symbols")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/perf.data"
        subprocess.run(
            ["perf", "record", "-F", "1999", "-D", str(args.skip_ms), "-o", data, args.binary,
             "--bench", "--profile-time", str(args.secs), args.filter],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        out = subprocess.run(
            ["perf", "report", "-i", data, "--no-children", "--sort", "symbol", "--stdio",
             "--percent-limit", "0", "--time", "25%-100%"],
            check=True, capture_output=True, text=True,
        ).stdout

    shares = collections.Counter()
    symbols = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[[.k]\]\s+(.*?)\s*$", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2)
        if re.search(SETUP, sym):
            continue
        shares[categorize(sym)] += pct
        symbols.append((pct, sym))
    total = sum(shares.values()) or 1.0
    rows = []
    for cat, pct in shares.most_common():
        share = pct / total
        ms = share * args.ms_per_iter if args.ms_per_iter else None
        rows.append({"category": cat, "share": share, "ms": ms})
    label = f" ({args.label})" if args.label else ""
    print(f"| op category{label} | share | ms / iteration |")
    print("|---|---|---|")
    for r in rows:
        ms = f"{r['ms']:.1f}" if r["ms"] is not None else "—"
        print(f"| {r['category']} | {100 * r['share']:.1f} % | {ms} |")
    print()
    print("hottest symbols:")
    for pct, sym in symbols[: args.top]:
        print(f"  {pct:6.2f} %  {sym[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": args.label, "ms_per_iter": args.ms_per_iter, "rows": rows,
                       "symbols": symbols[:40]}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
