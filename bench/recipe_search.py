"""Which recipe learns the most in the same wall time: `gpt2scratch train` runs one after another, each with
--time-budget, and a table of their final val bits per byte (medians over --repeats runs).

    python bench/recipe_search.py                                  # the CPU default's preset, 4 recipes, 8 min
    python bench/recipe_search.py --minutes 2 --repeats 1          # a quick screen
    python bench/recipe_search.py --recipe "muon-wsd: --optimizer muon --schedule wsd" --recipe "base:"

A recipe is "NAME: FLAGS" (flags added to `train --preset PRESET --time-budget MINUTES`). Runs are interleaved
(recipe 1, 2, ..., then again) so that the machine's drift spreads over all of them. Each run's folder is under
--out; the data folder is prepared once, before the first run, outside the timed budget.
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--recipe", action="append", help="NAME: FLAGS (repeatable; default: AdamW/Muon x cosine/WSD)")
    parser.add_argument("--out", default="runs/recipes")
    args = parser.parse_args()
    recipes = dict(parse(text) for text in (args.recipe or DEFAULT_RECIPES))
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    warm = ["--preset", args.preset, "--max-steps", "1", "--time-budget", "0", "--out", f"{args.out}/warm"]
    warm = run_cli("train", *warm, "--overwrite")
    if warm.returncode != 0:  # (prepares the data folder, so that no timed run pays for it)
        raise SystemExit(warm.stderr)
    for repeat in range(args.repeats):
        for name, flags in recipes.items():
            folder = Path(args.out) / f"{name}-{repeat}"
            started = time.perf_counter()
            result = run_cli("train", "--preset", args.preset, "--time-budget", str(args.minutes), *flags,
                             "--out", str(folder), "--overwrite", timeout=args.minutes * 60 * 3 + 600)  # fmt: skip
            if result.returncode != 0:
                raise SystemExit(f"{name}: {result.stderr[-2000:]}")
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in records if "val_bpb" in r]
            steps = max(r["step"] for r in records if "train_loss" in r)
            results[name].append(
                {"val_bpb": evals[-1]["val_bpb"], "steps": steps, "minutes": (time.perf_counter() - started) / 60}
            )
            print(f"{name} run {repeat + 1}: val bpb {evals[-1]['val_bpb']:.4f}, {steps} steps", flush=True)
    print(f"\n{args.preset}, {args.minutes:g}-minute budget, {args.repeats} run(s) each (median, then each run)")
    print(f"{'recipe':<16} {'val bpb':>8} {'runs':<24} {'steps':>6}  flags")
    for name, runs in results.items():
        bpb = statistics.median(r["val_bpb"] for r in runs)
        each = ", ".join(f"{r['val_bpb']:.4f}" for r in runs)
        steps = statistics.median(r["steps"] for r in runs)
        print(f"{name:<16} {bpb:>8.4f} {each:<24} {steps:>6.0f}  {shlex.join(recipes[name])}")


def parse(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition(":")
    return name.strip(), shlex.split(flags)


if __name__ == "__main__":
    main()
