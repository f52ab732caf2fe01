"""What bf16, int8 and int8-dynamic (`--dtype`) cost in quality: teacher forcing over the val split, against fp32.

    python bench/dtype_quality.py RUN                  # e.g. the folder `python main.py --out RUN` trained
    python bench/dtype_quality.py RUN --windows 200 --data-dir data/shakespeare-bpe4096

For each dtype: top-1 agreement with fp32's next-token predictions and the mean val loss, over the first
--windows windows of context_length tokens of the val split (the model's training data unless --data-dir).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from gpt2scratch import loading
from gpt2scratch.dataset.dataset import TokenSplit


def teacher_forced(model, split: TokenSplit, windows: int) -> tuple[torch.Tensor, float]:
    """Top-1 predictions and the mean cross-entropy over the split's first `windows` windows."""
    T = model.config.context_length
    windows = min(windows, (len(split) - 1) // T)
    tokens = torch.from_numpy(split.read(0, windows * T + 1).astype("int64"))
    x, y = tokens[:-1].view(windows, T), tokens[1:].view(windows, T)
    predictions, loss = [], 0.0
    with torch.no_grad():
        for i in range(0, windows, 8):
            logits, _ = model(x[i : i + 8])
            predictions.append(logits.argmax(-1))
            loss += F.cross_entropy(logits.float().flatten(0, 1), y[i : i + 8].flatten(), reduction="sum").item()
    return torch.cat(predictions), loss / y.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data-dir")
    parser.add_argument("--windows", type=int, default=100)
    args = parser.parse_args()
    results = {}
    for dtype in ("fp32", "bf16", "int8", "int8-dynamic"):
        loaded = loading.load(args.model, dtype=dtype)
        split = TokenSplit(args.data_dir or loaded.config.data.dir, "val")
        results[dtype] = teacher_forced(loaded.model, split, args.windows)
    top1, loss = results["fp32"]
    print(f"{args.model}: {top1.numel():,} val positions")
    print(f"{'dtype':>12} {'top-1 = fp32':>13} {'val loss':>9} {'vs fp32':>9}")
    for dtype, (predictions, value) in results.items():
        agreement = (predictions == top1).float().mean().item()
        print(f"{dtype:>12} {agreement:>13.2%} {value:>9.4f} {(value - loss) / loss:>+9.3%}")


if __name__ == "__main__":
    main()
