"""Paired differences across the POISE racing reports of worlds 200-299: the seed-noise UtilityGP against the
WhiteKernel one (UtilityGP.SEED_NOISE = False), under racing and under one seed per node (docs/racing.md).
Run from the repository root: PYTHONPATH=. python bench/results/racing_gp_ablation.py"""

import json

from app.landscape import paired_difference


def per_seed(path, policy, metric):
    report = json.load(open(path))
    return report["seeds"], report["selectors"]["poise"]["policies"][policy][metric]["per_seed"]
R = "bench/results/"
arms = {"seed-noise GP, racing": (R + "racing_simulated_poise.json", "racing"),
        "seed-noise GP, one": (R + "racing_simulated_poise.json", "one"),
        "WhiteKernel GP, racing": (R + "racing_simulated_poise_whitekernel_racing.json", "racing"),
        "WhiteKernel GP, one": (R + "racing_simulated_poise_whitekernel_one.json", "one")}
pairs = [("seed-noise GP, racing", "WhiteKernel GP, racing"), ("seed-noise GP, one", "WhiteKernel GP, one"),
         ("WhiteKernel GP, racing", "WhiteKernel GP, one"), ("seed-noise GP, racing", "WhiteKernel GP, one")]
print("| paired difference | metric | mean | SE | mean / SE |\n|---|---|---|---|---|")
for a, b in pairs:
    for metric in ("reported_better", "reported_gain", "best_gain", "overclaim"):
        seeds_a, x = per_seed(*arms[a], metric)
        seeds_b, y = per_seed(*arms[b], metric)
        assert seeds_a == seeds_b
        mean, se = paired_difference(x, y)
        print(f"| {a} − {b} | {metric} | {mean:+.4f} | {se:.4f} | {mean / se if se else float('nan'):+.1f} |")
