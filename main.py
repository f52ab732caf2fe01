"""The seed's entry point: `python main.py` trains GPT-2 from scratch with sensible defaults.

    python main.py                      # prepare the embedded corpus if needed, train, sample, export
    python main.py --out runs/first     # any `gpt2scratch train` option works here too (see --help)

It is `gpt2scratch train` with its defaults: on a GPU, the `gpu` preset (a model and 1,000 steps sized for the
embedded corpus, Muon + WSD, under a minute on an H200, at most 5 minutes on slower GPUs); on a CPU, the `cpu`
preset (a small model, a 16384-token BPE trained on the corpus, Muon + WSD, an 8-minute budget), so that it
finishes within 10 minutes on a 2-core laptop. The seed's GPT-2 124M recipe is `--preset gpt2` (README,
"Training on GPUs"). At the end it prints samples and writes a Hugging Face folder (RUN/hf) that the seed's usage
snippet loads.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works before `pip install -e .` too

from gpt2scratch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
