"""Which recipe learns the most in the same wall time (or the same number of steps): `gpt2scratch train` runs
one after another, and a table of their final val bits per byte (medians over --repeats runs).

    python bench/recipe_search.py                                  # the CPU default's preset, 4 recipes, 8 min
    python bench/recipe_search.py --minutes 2 --repeats 1          # a quick screen
    python bench/recipe_search.py --recipe "muon-wsd: --optimizer muon --schedule wsd" --recipe "base:"
    python bench/recipe_search.py --preset small --steps 100 --recipe "adamw: --optimizer adamw" \\
        --recipe "muon: --optimizer muon"                          # sample efficiency: the same tokens for each

A recipe is "NAME: FLAGS" (flags added to `train --preset PRESET --time-budget MINUTES`, or with --steps N to
`train --preset PRESET --time-budget 0 --max-steps N`). Runs are interleaved (recipe 1, 2, ..., then again) so
that the machine's drift spreads over all of them. With --steps the table also says at which step each recipe
first reached the first recipe's final val loss (evaluations every --eval-every steps), and that step's share of
N. Each run's folder is under --out; the data folder is prepared once, before the first run, outside the timed
budget.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

from gpt2scratch.testing import run_cli

DEFAULT_RECIPES = [
    "adamw-cosine: --optimizer adamw --schedule cosine",
    "adamw-wsd: --optimizer adamw --schedule wsd",
    "muon-cosine: --optimizer muon --schedule cosine --muon-lr 6e-3",
    "muon-wsd: --optimizer muon --schedule wsd --muon-lr 6e-3",  # the cpu preset's
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=0, help="a fixed number of steps instead of --minutes")
    parser.add_argument("--eval-every", type=int, default=10, help="with --steps: evaluations every N steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--recipe", action="append", help="NAME: FLAGS (repeatable; default: AdamW/Muon x cosine/WSD)")
    parser.add_argument("--out", default="runs/recipes")
    args = parser.parse_args()
    recipes = dict(parse(text) for text in (args.recipe or DEFAULT_RECIPES))
    if args.steps:
        budget = ["--time-budget", "0", "--max-steps", str(args.steps), "--eval-every", str(args.eval_every)]
        timeout = 24 * 3600
    else:
        budget, timeout = ["--time-budget", str(args.minutes)], args.minutes * 60 * 3 + 600
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    warm = ["--preset", args.preset, "--max-steps", "1", "--time-budget", "0", "--out", f"{args.out}/warm"]
    warm = run_cli("train", *warm, "--overwrite")
    if warm.returncode != 0:  # (prepares the data folder, so that no timed run pays for it)
        raise SystemExit(warm.stderr)
    for repeat in range(args.repeats):
        for name, flags in recipes.items():
            folder = Path(args.out) / f"{name}-{repeat}"
            started = time.perf_counter()
            result = run_cli("train", "--preset", args.preset, *budget, *flags, "--out", str(folder), "--overwrite",
                             timeout=timeout)  # fmt: skip
            if result.returncode != 0:
                raise SystemExit(f"{name}: {result.stderr[-2000:]}")
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            evals = {r["step"]: r for r in records if "val_bpb" in r}
            steps = max(r["step"] for r in records if "train_loss" in r)
            minutes = (time.perf_counter() - started) / 60
            final = evals[max(evals)]
            results[name].append({"evals": evals, "final": final, "steps": steps, "minutes": minutes})
            print(f"{name} run {repeat + 1}: val bpb {final['val_bpb']:.4f}, {steps} steps, {minutes:.1f} min",
                  flush=True)  # fmt: skip
    what = f"{args.steps} steps" if args.steps else f"{args.minutes:g}-minute budget"
    print(f"\n{args.preset}, {what}, {args.repeats} run(s) each (median, then each run)")
    reached = {}
    if args.steps:  # the first step at which each run's val loss is at or below the first recipe's final one
        target = statistics.median(r["final"]["val_loss"] for r in next(iter(results.values())))
        reached = {name: [first_step_at(r["evals"], target) for r in runs] for name, runs in results.items()}
        print(f"reached: the first evaluation with val loss <= {target:.4f} (the first recipe's median final)")
    print(f"{'recipe':<16} {'val bpb':>8} {'runs':<24} {'steps':>6} {'reached':>14}  flags")
    for name, runs in results.items():
        bpb = statistics.median(r["final"]["val_bpb"] for r in runs)
        each = ", ".join(f"{r['final']['val_bpb']:.4f}" for r in runs)
        steps = statistics.median(r["steps"] for r in runs)
        at = reached.get(name)
        shown = "" if at is None else ", ".join("-" if s is None else str(s) for s in at)
        if at and None not in at:
            shown += f" ({statistics.median(at) / args.steps:.2f}x)"
        print(f"{name:<16} {bpb:>8.4f} {each:<24} {steps:>6.0f} {shown:>14}  {shlex.join(recipes[name])}")


def first_step_at(evals: dict[int, dict], target: float) -> int | None:
    return next((step for step in sorted(evals) if evals[step]["val_loss"] <= target + 1e-9), None)


def parse(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition(":")
    return name.strip(), shlex.split(flags)


if __name__ == "__main__":
    main()
