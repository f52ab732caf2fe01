"""Benchmark `prepare`: throughput with 1 process and with all cores, beside transformers' tokenizer.

    python bench/prepare_throughput.py              # the embedded Shakespeare corpus (5 MB)
    python bench/prepare_throughput.py --copies 40  # the corpus 40 times in one folder (200 MB): memory stays flat

Runs are interleaved (1 process, all cores, reference, again) `--rounds` times and the medians printed. The
reference is transformers' GPT2TokenizerFast (Rust `tokenizers`) encoding the same documents in one batch, in
a child process: tokenization only, no file writing, so it flatters the reference.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpt2scratch.dataset.data_module import prepare
from gpt2scratch.dataset.sources import EMBEDDED_CORPUS
from gpt2scratch.options import PrepareOptions


def corpus_texts() -> list[str]:
    with tarfile.open(EMBEDDED_CORPUS, "r:xz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
        return [archive.extractfile(m).read().decode("utf-8") for m in members]


REFERENCE = """
import sys, time
from pathlib import Path
from transformers import GPT2TokenizerFast
from gpt2scratch.dataset.tokenizer import GPT2_DIR
hf = GPT2TokenizerFast.from_pretrained(GPT2_DIR)
texts = [p.read_text(encoding="utf-8") for p in sorted(Path(sys.argv[1]).iterdir())]
started = time.perf_counter()
hf(texts)
print(time.perf_counter() - started)
"""


def reference_seconds(inputs: Path) -> float:
    """transformers' tokenizer on the same documents, in a child process (so its memory is not counted here)."""
    result = subprocess.run([sys.executable, "-c", REFERENCE, str(inputs)], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1, help="copies of the corpus in the input folder")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    texts = corpus_texts()
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for copy in range(args.copies):
            for i, text in enumerate(texts):
                (inputs / f"{copy:03d}_{i:02d}.txt").write_text(text, encoding="utf-8")
        n_bytes = sum(p.stat().st_size for p in inputs.iterdir())
        seconds: dict[str, list[float]] = {"1 process": [], f"{cores} processes": [], "transformers (reference)": []}
        n_tokens = 0
        for round_ in range(args.rounds):
            for workers, label in ((1, "1 process"), (cores, f"{cores} processes")):
                options = PrepareOptions(workers=workers, progress=False)
                result = prepare([str(inputs)], Path(tmp) / f"out-{round_}-{workers}", options)
                seconds[label].append(result.seconds)
                n_tokens = sum(split["tokens"] for split in result.manifest["splits"].values())
            seconds["transformers (reference)"].append(reference_seconds(inputs))

    print(f"corpus: {n_bytes / 1e6:.1f} MB, {n_tokens:,} tokens; {args.rounds} interleaved rounds, medians")
    print(f"{'':26} {'seconds':>8} {'MB/s':>8} {'tokens/s':>12} {'vs 1 process':>13}")
    base = statistics.median(seconds["1 process"])
    for label, values in seconds.items():
        median = statistics.median(values)
        rates = f"{n_bytes / 1e6 / median:8.2f} {n_tokens / median:12,.0f}"
        print(f"{label:26} {median:8.2f} {rates} {base / median:12.2f}x")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the main prepare process: {peak_mib:.0f} MiB (input: {n_bytes / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
