"""The seed's entry point: `python main.py`.

Until the trainer lands this runs a short smoke demo: it builds a tiny GPT-2, checks it against the seed's
architecture notes and prints what `gpt2scratch info` reports for the seed's default model.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # works before `pip install -e .` too

import torch  # noqa: E402

from gpt2scratch.cli import main  # noqa: E402
from gpt2scratch.config import resolve_config  # noqa: E402
from gpt2scratch.dataset.tokenizer import Tokenizer  # noqa: E402
from gpt2scratch.models import GPT  # noqa: E402

if __name__ == "__main__":
    tokenizer = Tokenizer.gpt2()
    model = GPT(resolve_config("tiny").model).eval()
    ids = torch.tensor([tokenizer.encode("Once upon a time")])
    logits, loss = model(ids[:, :-1], targets=ids[:, 1:])
    print(f"tiny GPT-2: {model.num_params():,} parameters, loss at init {loss.item():.3f} (ln 50257 = 10.825)")
    sys.exit(main(["info"]))
