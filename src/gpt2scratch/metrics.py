"""What a person sees and keeps of a run, written by rank 0 only: log lines over a progress bar, metrics.jsonl
(one JSON object per step and per evaluation), loss.png, and TensorBoard events when tensorboard is installed.

metrics.jsonl records:
    {"step", "train_loss", "lr", "grad_norm", "tokens", "dt_ms", "tokens_per_sec"[, "mfu"]}   after each step
    {"step", "val_loss", "val_ppl", "val_bpb", "val_tokens"[, "hellaswag_acc", "hellaswag_acc_norm"]}
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool):
        self.run_dir = Path(run_dir)
        self.enabled = enabled  # rank 0; the other ranks write nothing
        self.path = self.run_dir / METRICS_FILE
        self._bar = None
        self._tensorboard = None
        self._warned_no_plot = False

    # ---- the progress bar and log lines -------------------------------------------------------------------------

    def open(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            desc="training",
            disable=not self.enabled or not sys.stderr.isatty(),  # in a log file: the log lines only
            dynamic_ncols=True,
        )

    def set_total(self, total: int) -> None:
        self._bar.total = total
        self._bar.refresh()

    def print(self, text: str) -> None:
        """A line above the bar (rank 0)."""
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard:
            self._tensorboard.close()

    # ---- records ------------------------------------------------------------------------------------------------

    def log_step(self, record: dict) -> None:
        """Advance the bar and keep the step's record (its log line is printed when due: `print`)."""
        self._bar.update(1)
        self._bar.set_postfix_str(
            f"loss {record['train_loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_sec']:,.0f} tok/s",
            refresh=False,
        )
        self.write(record)

    def log_eval(self, record: dict, history: list[dict], best_val_loss: float) -> None:
        self.write(record)
        self.print(format_record(record))
        if self.enabled:
            self._plot(history, best_val_loss)

    def write(self, record: dict) -> None:
        """Append one record to metrics.jsonl (and TensorBoard)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            self._tensorboard = _tensorboard_writer(self.run_dir)
        if self._tensorboard:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, record["step"])

    def truncate(self, step: int) -> None:
        """After a resume, forget what was logged after the checkpoint (the run repeats those steps)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and _line_step(line) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _plot(self, history: list[dict], best_val_loss: float) -> None:
        """loss.png: train loss per step and val loss per evaluation (skipped without matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not self._warned_no_plot:
                log.warning(f"{PLOT_FILE} is not drawn: matplotlib is not installed (pip install 'gpt2scratch[plot]')")
                self._warned_no_plot = True
            return
        train = [json.loads(line) for line in self.path.read_text().splitlines() if '"train_loss"' in line]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", linewidth=0.8)
        ax.plot([r["step"] for r in history], [r["val_loss"] for r in history], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(f"{self.run_dir.name}: best val loss {best_val_loss:.4f}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / PLOT_FILE, dpi=100)
        plt.close(fig)


def format_record(record: dict) -> str:
    """One log line for a step or an evaluation record."""
    if "val_loss" in record:
        text = (
            f"step {record['step']:>6} | val loss {record['val_loss']:.4f} | ppl {record['val_ppl']:.2f} | "
            f"bpb {record['val_bpb']:.4f}"
        )
        if "hellaswag_acc_norm" in record:
            text += f" | HellaSwag acc_norm {record['hellaswag_acc_norm']:.4f}"
        return text
    text = (
        f"step {record['step']:>6} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
        f"norm {record['grad_norm']:.3f} | {record['dt_ms']:.0f} ms | {record['tokens_per_sec']:,.0f} tok/s"
    )
    return text + (f" | MFU {100 * record['mfu']:.1f}%" if "mfu" in record else "")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # an unreadable line (e.g. cut by a kill) is dropped


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return False
    return SummaryWriter(str(run_dir / "tensorboard"))
