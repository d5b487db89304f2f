"""Does a torch-native FP8 run track its fp32 run? The 200-step tiny run's final validation loss
in FP8 (hybrid) against fp32, measured against how much each precision scatters on its own.

A run's final loss is a noisy function of its rounding: after a few hundred steps on this
corpus two runs that differ only in rounding end apart. So each (method, seed) is run several
times in each precision, changing nothing but where the rounding falls:

- fp32: the global batch of 8 split into 1, 2 and 4 micro-batches (only the order in which
  the gradient is summed changes);
- FP8: the plain run, and runs with the FP8 grid shifted: every per-tensor scale of
  megatron_wesar.fp8 multiplied by 2**u, u ~ U[0, 1) drawn per quantization from a seeded
  generator. The format's precision is unchanged (a shift moves every value within its binade;
  at most the lowest binade of the range is lost); only where each value's rounding falls moves,
  so each shift is an independent FP8 run with the same statistics.

For each (method, seed) it prints the final validation losses, the difference of the means
FP8 - fp32 and its standard error (Welch: sqrt(s8^2 / n8 + s32^2 / n32)), and ends with, per
method, `fp8_minus_fp32_<method>` (the mean over seeds of that difference) and
`fp8_minus_fp32_se_<method>` (its standard error), `fp8_minus_fp32_over_se_max_<method>` (the
largest |difference| / standard error over seeds), and `fp32_rounding_std_<method>`,
`fp8_rounding_std_<method>` (how much the runs of one seed scatter, pooled over seeds).

    python bench/fp8_tracking.py                      # wesar, he x seeds 1234 1 2: 42 runs
    python bench/fp8_tracking.py --methods wesar --seeds 2 --dir out/fp8-tracking

Runs are sequential (~45-60 s each on 2 CPU cores). Each run's metrics file is kept in --dir
and a complete one is reused, so an interrupted measurement resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

RUN = ["--preset", "tiny", "--train-iters", "200", "--global-batch-size", "8",
       "--seq-length", "64", "--eval-iters", "8"]
METHODS = {"wesar": ["--wesar"], "he": ["--no-wesar"]}
FP32_MICRO_BATCHES = (8, 4, 2)
FP8_SHIFTS = (None, 1, 2, 3)  # None: the plain FP8 run; n: grid shifts drawn from seed n


def shift_fp8_grid(seed: int) -> None:
    """Multiply every per-tensor scale megatron_wesar.fp8 computes by 2**u, u ~ U[0, 1) from a
    generator seeded with `seed` (this process only)."""
    import torch

    import megatron_wesar.fp8 as fp8

    generator = torch.Generator().manual_seed(seed)
    quantize = fp8.quantize

    def shifted(tensor, amax, dtype):
        return quantize(tensor, amax * 2.0 ** float(torch.rand((), generator=generator)), dtype)

    fp8.quantize = shifted


def final_valid_loss(path: str, train_iters: int = 200) -> float | None:
    """The validation loss at `train_iters` in a metrics file, None when the run did not end."""
    if not os.path.isfile(path):
        return None
    with open(path) as lines:
        for line in lines:
            record = json.loads(line)
            if record.get("iteration") == train_iters and "valid_loss" in record:
                return float(record["valid_loss"])
    return None


def run(directory: str, method: str, seed: int, precision: str, variant) -> float:
    """One 200-step run (reused when its metrics file is complete); its final validation loss."""
    name = f"{method}_{precision}_{'plain' if variant is None else variant}_s{seed}"
    metrics = os.path.join(directory, name + ".jsonl")
    loss = final_valid_loss(metrics)
    if loss is not None:
        return loss
    args = RUN + METHODS[method] + ["--seed", str(seed), "--metrics-file", metrics]
    if precision == "fp32":
        command = [sys.executable, "-m", "megatron_wesar", "pretrain", *args,
                   "--micro-batch-size", str(variant)]
    else:
        args += ["--micro-batch-size", "8", "--fp8-format", "hybrid"]
        command = ([sys.executable, "-m", "megatron_wesar", "pretrain", *args] if variant is None
                   else [sys.executable, os.path.abspath(__file__), "--shift-seed", str(variant),
                         "--", *args])
    if os.path.exists(metrics):
        os.remove(metrics)
    with open(os.path.join(directory, name + ".log"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    loss = final_valid_loss(metrics)
    if loss is None:
        raise RuntimeError(f"{name}: no final validation loss in {metrics}")
    return loss


def compare(fp32: list[float], fp8: list[float]) -> dict:
    """Means, stds, FP8 - fp32 difference of the means and its Welch standard error."""
    s32, s8 = statistics.stdev(fp32), statistics.stdev(fp8)
    diff = statistics.fmean(fp8) - statistics.fmean(fp32)
    se = math.sqrt(s8 ** 2 / len(fp8) + s32 ** 2 / len(fp32))
    return {"fp32_mean": statistics.fmean(fp32), "fp8_mean": statistics.fmean(fp8),
            "fp32_std": s32, "fp8_std": s8, "diff": diff, "se": se}


def main(argv=None) -> int:
    """Run (or reuse) every realization, print the table and the summary lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="wesar,he")
    parser.add_argument("--seeds", default="1234,1,2")
    parser.add_argument("--dir", default="out/fp8-tracking")
    parser.add_argument("--shift-seed", type=int, help=argparse.SUPPRESS)  # worker: one run
    args, rest = parser.parse_known_args(argv)
    if args.shift_seed is not None:
        shift_fp8_grid(args.shift_seed)
        from megatron_wesar.cli import main as cli_main

        return cli_main(["pretrain", *[a for a in rest if a != "--"]])
    os.makedirs(args.dir, exist_ok=True)
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    for method in methods:
        for seed in seeds:
            fp32 = [run(args.dir, method, seed, "fp32", m) for m in FP32_MICRO_BATCHES]
            fp8 = [run(args.dir, method, seed, "fp8", s) for s in FP8_SHIFTS]
            rows[method, seed] = (fp32, fp8, compare(fp32, fp8))
    print("| method | seed | fp32 (micro-batch 8, 4, 2) | FP8 (plain, shifts 1-3) "
          "| fp32 mean +- std | FP8 mean +- std | FP8 - fp32 | se | diff / se |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (method, seed), (fp32, fp8, c) in rows.items():
        print(f"| {method} | {seed} | {', '.join(f'{v:.4f}' for v in fp32)} | "
              f"{', '.join(f'{v:.4f}' for v in fp8)} | {c['fp32_mean']:.4f} +- {c['fp32_std']:.4f}"
              f" | {c['fp8_mean']:.4f} +- {c['fp8_std']:.4f} | {c['diff']:+.4f} | {c['se']:.4f} "
              f"| {c['diff'] / c['se']:+.2f} |")
    for method in methods:
        mine = [rows[method, seed][2] for seed in seeds]
        se_of_mean = math.sqrt(sum(c["se"] ** 2 for c in mine)) / len(mine)
        print(f"fp8_minus_fp32_{method}: {statistics.fmean(c['diff'] for c in mine):.4f}")
        print(f"fp8_minus_fp32_se_{method}: {se_of_mean:.4f}")
        print(f"fp8_minus_fp32_over_se_max_{method}: "
              f"{max(abs(c['diff']) / c['se'] for c in mine):.2f}")
        for precision in ("fp32", "fp8"):
            pooled = math.sqrt(statistics.fmean(c[f"{precision}_std"] ** 2 for c in mine))
            print(f"{precision}_rounding_std_{method}: {pooled:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
