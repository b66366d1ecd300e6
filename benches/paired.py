#!/usr/bin/env python3
"""Paired comparison of two ../shared/bench targets from interleaved rounds.

This machine's rounds move by ±10–25 % with its phases, and its latency tail has host pauses of 5–30 ms, so
one run's medians can land either way. Rounds of the two targets run back to back (benches/paired.sh), so each
pair shares the machine's phase: the per-pair ratio is what this prints, with its median, a bootstrap 95 %
interval of that median, and in how many pairs the target did at least as well as the base.

    benches/paired.py RESULTS_DIR [BASE TARGET...]     (defaults: N GW-plain)

Outside this repository it reads only RESULTS_DIR, written by ../shared/bench/run.sh (benches/paired.sh passes
its own); it does not need the harness itself.
"""
import glob
import json
import os
import random
import statistics
import sys


def rounds(results, target):
    """Every round of `target` under `results`, oldest first (the order they ran in)."""
    files = glob.glob(os.path.join(results, "**", "raw", f"{target}.r*.json"), recursive=True)
    files = [f for f in files if not f.endswith(".warmup.json")]
    return [json.load(open(f)) for f in sorted(files, key=os.path.getmtime)]


def median_interval(values, draws=10000, seed=1):
    """Median and a percentile-bootstrap 95 % interval of it (fixed seed: the same data prints the same)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.median(values), meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    results = sys.argv[1]
    base, targets = (sys.argv[2], sys.argv[3:]) if len(sys.argv) > 3 else ("N", ["GW-plain"])
    for target in targets:
        compare(results, base, target)


def compare(results, base, target):
    a, b = rounds(results, base), rounds(results, target)
    n = min(len(a), len(b))
    if n < 3:
        sys.exit(f"need at least 3 rounds of each target under {results} (found {len(a)} {base}, {len(b)} {target})")
    a, b = a[:n], b[:n]
    print(f"\n{n} pairs of interleaved rounds, {target} against {base}\n")
    print(f"| measure | {base} median | {target} median | ratio {target}/{base}: median of pairs | 95 % interval | pairs where {target} is at least as good |")
    print("|---|--:|--:|--:|--:|--:|")
    for key, label, higher_is_better in [
        ("rps", "req/s", True),
        ("p50_us", "p50 µs", False),
        ("p99_us", "p99 µs", False),
        ("target_cpu_us_per_req", "CPU µs/req", False),
    ]:
        ratios = [y[key] / x[key] for x, y in zip(a, b)]
        mid, lo, hi = median_interval(ratios)
        good = sum((r >= 1) if higher_is_better else (r <= 1) for r in ratios)
        print(
            f"| {label} | {statistics.median(x[key] for x in a):,.1f} | {statistics.median(y[key] for y in b):,.1f} "
            f"| {mid:.3f} | {lo:.3f}–{hi:.3f} | {good} of {n} |"
        )

if __name__ == "__main__":
    main()
