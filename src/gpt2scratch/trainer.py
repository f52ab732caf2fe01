"""The training loop: GPT-2 from scratch on a CPU, a GPU, or many (torchrun + DDP or FSDP2), resumable bit for bit.

    python main.py                                    # the default run (see main.py)
    gpt2scratch train --preset tiny --max-steps 40 --out runs/tiny
    torchrun --standalone --nproc_per_node=8 -m gpt2scratch train --preset gpt2 --data-dir data/fineweb

One step = one optimizer update of `tokens_per_step` tokens, reached by gradient accumulation over
micro-batches of `batch_size` x `context_length` tokens on each of `world_size` ranks:

    for step in range(start, max_steps):
        lr = cosine schedule with linear warm-up (the seed's numbers)
        for each micro-batch: loss = model(x, y) / accumulation; loss.backward()   (grads all-reduced at the last)
        clip the gradient norm; AdamW step (or skip it if the loss or the norm is not finite)
        log; every eval_every: val loss / perplexity / bits per byte; sample; checkpoint
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2scratch import checkpoint
from gpt2scratch.config import Config, TrainingConfig
from gpt2scratch.dataset.dataset import DataModule
from gpt2scratch.dataset.tokenizer import Tokenizer
from gpt2scratch.estimates import flops_per_token
from gpt2scratch.evaluation import evaluate_hellaswag, evaluate_val, fetch, hellaswag_examples
from gpt2scratch.generation import generate
from gpt2scratch.models import GPT

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run stops
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40": 181e12, "A10": 125e12}


REFIT_STEP = 100  # with --time-budget, max_steps is fitted again from the step times measured up to here


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, out of memory); the message says what to change."""


@dataclass
class Budget:
    """A wall-clock budget (--time-budget): when it ends, and what one evaluation costs."""

    deadline: float  # time.perf_counter() value
    eval_seconds: float

    def steps_left(self, step_seconds: float, eval_every: int, now: float) -> int:
        seconds = self.deadline - now
        steps = seconds / step_seconds
        n_evals = 1 + (int(steps) // eval_every if eval_every else 0)
        return max(1, int((seconds - n_evals * self.eval_seconds) / step_seconds))


# ----------------------------------------------------------------------------------------------------------------------
# Where the run executes: device, precision, ranks.


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    compile: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def pick_device(requested: str, local_rank: int = 0) -> tuple[torch.device, str]:
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested} was asked for, but CUDA is not available; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {requested} was asked for, but MPS is not available; use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device, "as asked"
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank), f"CUDA is available ({torch.cuda.get_device_name(local_rank)})"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "Apple MPS is available"
    return torch.device("cpu"), "no GPU found"


def pick_precision(requested: str, device: torch.device) -> tuple[str, str]:
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ValueError("precision fp16 is not supported on the CPU; use bf16 or fp32")
        return requested, "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU supports bfloat16"
        return "fp16", "the GPU has no bfloat16: float16 with a gradient scaler"
    if device.type == "cpu" and _cpu_has_native_bf16():
        return "bf16", "the CPU has native bfloat16 instructions (avx512_bf16/amx): ~1.5x faster than fp32"
    return "fp32", f"{device.type}: full precision (bf16 would be emulated)"


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay with fp32
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def setup_runtime(training: TrainingConfig) -> Runtime:
    """Read torchrun's environment, pick device and precision, start the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, device_reason = pick_device(training.device, local_rank)
    precision, precision_reason = pick_precision(training.precision, device)
    use_compile = training.compile == "on" or (training.compile == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: free speed, no visible loss of accuracy
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    runtime = Runtime(device, precision, use_compile, rank, local_rank, world_size)
    if runtime.is_main:
        log.info(f"device: {device} ({device_reason}); precision: {precision} ({precision_reason})")
        log.info(f"torch.compile: {'on' if use_compile else 'off'}; ranks: {world_size}")
    return runtime


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule.


def lr_at(step: int, training: TrainingConfig) -> float:
    """The seed's schedule: linear warm-up to max_lr over warmup_steps, cosine decay to min_lr at max_steps."""
    if step < training.warmup_steps:
        return training.max_lr * (step + 1) / training.warmup_steps
    if step >= training.max_steps or training.max_steps == training.warmup_steps:
        return training.min_lr
    decay_ratio = (step - training.warmup_steps) / (training.max_steps - training.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return training.min_lr + coeff * (training.max_lr - training.min_lr)


def configure_optimizer(model: torch.nn.Module, training: TrainingConfig, device: torch.device):
    """AdamW; weight decay on matrices (dim >= 2: linear weights, embeddings), not on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": training.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=training.max_lr, betas=(training.beta1, training.beta2), eps=1e-8)
    if device.type in ("cuda", "cpu"):
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        config: Config,
        run_dir: str | Path,
        runtime: Runtime,
        data: DataModule,
        resume: bool = False,
        init_weights: dict[str, torch.Tensor] | None = None,
    ):
        self.config, self.runtime, self.data = config, runtime, data
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / checkpoint.CKPT_DIR
        t, m = config.training, config.model
        micro_tokens = t.batch_size * m.context_length * runtime.world_size
        if t.tokens_per_step == 0:
            self.accumulation = 1
        elif t.tokens_per_step % micro_tokens:
            raise ValueError(
                f"tokens_per_step ({t.tokens_per_step}) must be a multiple of batch_size x context_length x ranks "
                f"({t.batch_size} x {m.context_length} x {runtime.world_size} = {micro_tokens}); "
                f"e.g. --tokens-per-step {micro_tokens * max(1, round(t.tokens_per_step / micro_tokens))}"
            )
        else:
            self.accumulation = t.tokens_per_step // micro_tokens
        self.tokens_per_step = micro_tokens * self.accumulation

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.raw_model = GPT(config.model).to(runtime.device)
        if init_weights is not None:  # fine-tuning: start from these weights (a tied head follows wte)
            self.raw_model.load_state_dict(init_weights)
        if t.fsdp:
            if not runtime.distributed:
                raise ValueError("--fsdp shards the model across ranks: launch with torchrun --nproc_per_node=N")
            from torch.distributed.fsdp import fully_shard

            for block in self.raw_model.transformer.h:
                fully_shard(block)
            fully_shard(self.raw_model)
        self.optimizer = configure_optimizer(self.raw_model, t, runtime.device)
        self.scaler = torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None
        self.loader = data.train_loader()
        self.tokenizer = Tokenizer(data.tokenizer_dir())
        self.step = 0  # optimizer updates done
        self.best_val_loss, self.best_step = math.inf, None
        self.bad_steps = 0
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.history: list[dict] = []  # eval records, for the plot
        if runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        else:
            torch.manual_seed(t.seed + runtime.rank)  # dropout masks differ per rank
        self.model = self._wrap(self.raw_model)
        self._stop_requested = False
        self._tensorboard = None
        self.budget: Budget | None = None  # set by fit_steps_to_budget
        self._step_seconds: list[float] = []
        self._hellaswag_examples: list | None = None

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.runtime.compile:
            model = torch.compile(model)
        if self.runtime.distributed and not self.config.training.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    # ------------------------------------------------------------------------------------------------------------------
    # The loop.

    def fit(self) -> dict:
        t = self.config.training
        if self.runtime.is_main:
            (self.run_dir / "run_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            self._log_start()
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        progress = self._progress_bar()
        last_eval: dict = {}
        started = time.perf_counter()
        try:
            while self.step < t.max_steps and not self._should_stop():
                record = self._train_step()
                self.step += 1
                progress.update(1)
                progress.set_postfix_str(
                    f"loss {record['train_loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_sec']:,.0f} tok/s",
                    refresh=False,
                )
                self._write_metrics(record)
                self._step_seconds.append(record["dt_ms"] / 1000)
                if self.budget is not None and self.step == REFIT_STEP:
                    t = self._refit_budget(progress)
                if self.step % t.log_every == 0 or self.step == 1:
                    self._print(progress, self._format(record))
                last = self.step == t.max_steps
                if (t.eval_every and self.step % t.eval_every == 0) or last:
                    last_eval = self.evaluate()
                    self._record_eval(last_eval)
                    self._print(progress, self._format(last_eval))
                if (t.sample_every and self.step % t.sample_every == 0) or last:
                    for text in self.sample():
                        self._print(progress, f"--- sample at step {self.step} ---\n{text}")
                if ((t.save_every and self.step % t.save_every == 0) or last) and self.bad_steps == 0:
                    # (not while updates are being skipped: the last checkpoint stays the last good one)
                    self.save_checkpoint(last_eval.get("val_loss") if last_eval.get("step") == self.step else None)
            if self._stop_requested:
                self._print(progress, f"interrupted: saving a checkpoint at step {self.step}")
                self.save_checkpoint(None)
        finally:
            progress.close()
            signal.signal(signal.SIGINT, previous_handler)
            if self._tensorboard:
                self._tensorboard.close()
        return {
            "step": self.step,
            "minutes": (time.perf_counter() - started) / 60,
            "interrupted": self._stop_requested,
            **{k: v for k, v in last_eval.items() if k.startswith("val_")},
        }

    def _print(self, progress, text: str) -> None:
        if self.runtime.is_main:
            progress.write(text)

    def _refit_budget(self, progress) -> TrainingConfig:
        """Fit max_steps to the time left, from the median step time so far (the calibration is short)."""
        t = self.config.training
        step_seconds = statistics.median(self._step_seconds[5:] or self._step_seconds)
        steps = self.step + self.budget.steps_left(step_seconds, t.eval_every, time.perf_counter())
        steps = max(steps, t.warmup_steps, self.step + 1)
        if self.runtime.distributed:  # every rank must stop at the same step
            value = torch.tensor([steps], device=self.runtime.device)
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
            steps = int(value.item())
        self._print(
            progress, f"time budget: {step_seconds * 1000:.0f} ms/step so far; max_steps {t.max_steps} -> {steps}"
        )
        self.config = replace(self.config, training=replace(t, max_steps=steps))
        progress.total = steps
        progress.refresh()
        return self.config.training

    def _should_stop(self) -> bool:
        """Ctrl-C on any rank stops every rank at the same step (else the others would wait in a collective)."""
        if self.runtime.distributed:
            flag = torch.tensor([float(self._stop_requested)], device=self.runtime.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self._stop_requested = bool(flag.item())
        return self._stop_requested

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True

    def _train_step(self) -> dict:
        t, runtime = self.config.training, self.runtime
        started = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=runtime.device)
        for micro_step in range(self.accumulation):
            x, y = self._to_device(*self.loader.next_batch())
            last_micro = micro_step == self.accumulation - 1
            with self._gradient_sync(last_micro), runtime.autocast():
                _, loss = self._forward(x, y)
            loss = loss / self.accumulation
            loss_sum += loss.detach()
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if runtime.distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= runtime.world_size
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), t.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        train_loss, grad_norm = loss_sum.item(), grad_norm.item()
        if not math.isfinite(train_loss) or (self.scaler is None and not math.isfinite(grad_norm)):
            self._skip_step(train_loss, grad_norm)
        else:
            self.bad_steps = 0
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - started
        record = {
            "step": self.step + 1,
            "train_loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": (self.step + 1) * self.tokens_per_step,
            "dt_ms": dt * 1000,
            "tokens_per_sec": self.tokens_per_step / dt,
        }
        mfu = self._mfu(record["tokens_per_sec"])
        if mfu is not None:
            record["mfu"] = mfu
        return record

    def _forward(self, x: torch.Tensor, y: torch.Tensor):
        try:
            return self.model(x, y)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory with micro-batch {self.config.training.batch_size} x "
                f"{self.config.model.context_length}; use a smaller --batch-size (gradient accumulation keeps "
                "tokens_per_step) or a smaller model"
            ) from None
        except Exception as error:
            if not self.runtime.compile or self.step > 0 or isinstance(error, ValueError):
                raise
            log.warning(f"torch.compile failed ({type(error).__name__}: {error}); continuing without it")
            self.runtime.compile = False
            self.model = self._wrap(self.raw_model)
            self.optimizer.zero_grad(set_to_none=True)
            return self.model(x, y)

    def _gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        if not self.runtime.distributed or sync:
            if self.config.training.fsdp:
                self.raw_model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.config.training.fsdp:
            self.raw_model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _skip_step(self, train_loss: float, grad_norm: float) -> None:
        self.bad_steps += 1
        log.warning(
            f"step {self.step + 1}: loss {train_loss}, grad norm {grad_norm} is not finite; skipping this update "
            f"({self.bad_steps}/{MAX_BAD_STEPS} in a row)"
        )
        if self.bad_steps >= MAX_BAD_STEPS:
            raise TrainingError(
                f"{MAX_BAD_STEPS} non-finite losses in a row at step {self.step + 1}: the run diverged. "
                f"The last checkpoint in {self.ckpt_root} is intact; resume from it with a lower --max-lr"
            )

    def _to_device(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.runtime.device.type == "cuda":
            return (
                x.pin_memory().to(self.runtime.device, non_blocking=True),
                y.pin_memory().to(self.runtime.device, non_blocking=True),
            )
        return x.to(self.runtime.device), y.to(self.runtime.device)

    def _mfu(self, tokens_per_sec: float) -> float | None:
        if self.runtime.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.runtime.device)
        peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
        if peak is None:
            return None
        return flops_per_token(self.config.model) * tokens_per_sec / (peak * self.runtime.world_size)

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation and samples.

    def evaluate(self) -> dict:
        """Val loss (all of the split, or eval_tokens), perplexity, bits per byte; HellaSwag when it is due."""
        t, runtime = self.config.training, self.runtime
        val = evaluate_val(
            self.raw_model,
            self.data.val,
            t.batch_size,
            runtime.rank,
            runtime.world_size,
            max_tokens=t.eval_tokens or None,
            autocast=runtime.autocast(),
        )
        record = {
            "step": self.step,
            "val_loss": val["loss"],
            "val_ppl": val["ppl"],
            "val_bpb": val["bpb"],
            "val_tokens": val["tokens"],
        }
        if t.eval_hellaswag_every and self.step % t.eval_hellaswag_every == 0:
            hellaswag = evaluate_hellaswag(
                self.raw_model, self.tokenizer, self._hellaswag(), t.batch_size, runtime.rank, runtime.world_size
            )
            record.update(hellaswag_acc=hellaswag["acc"], hellaswag_acc_norm=hellaswag["acc_norm"])
        return record

    def _hellaswag(self) -> list:
        if self._hellaswag_examples is None:
            t = self.config.training
            path = t.hellaswag_file or fetch("hellaswag", "eval_data")  # as `gpt2scratch eval` does
            self._hellaswag_examples = hellaswag_examples(path, t.hellaswag_limit or None)
        return self._hellaswag_examples

    def _record_eval(self, record: dict) -> None:
        if record["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_step = record["val_loss"], record["step"]
        self.history.append(record)
        self._write_metrics(record)
        if self.runtime.is_main:
            self._plot()

    def sample(self, num_samples: int = 2) -> list[str]:
        """Texts generated from <|endoftext|> with the config's max_new_token, temperature and k_top."""
        t = self.config.training
        generator = torch.Generator(device=self.runtime.device).manual_seed(t.seed + self.step)
        prompt = torch.full((num_samples, 1), self.tokenizer.eot_id, dtype=torch.long, device=self.runtime.device)
        with self.runtime.autocast():
            out = generate(
                self.raw_model,
                prompt,
                t.max_new_token,
                temperature=t.temperature,
                top_k=t.k_top,
                eot_id=self.tokenizer.eot_id,
                generator=generator,
            )
        return [self.tokenizer.decode([i for i in row[1:].tolist() if i != self.tokenizer.eot_id]) for row in out]

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpoints.

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, unwrapped (a collective under FSDP: call it on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, val_loss: float | None) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = self.full_model_state()
        optimizer_state = get_optimizer_state_dict(self.raw_model, self.optimizer, options=options)
        if self.scaler is not None:
            optimizer_state = {**optimizer_state, "grad_scaler": self.scaler.state_dict()}
        rng = {"cpu": torch.get_rng_state()}
        if self.runtime.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.runtime.device)
        rng_states = [rng]
        if self.runtime.distributed:
            rng_states = [None] * self.runtime.world_size
            dist.all_gather_object(rng_states, rng)
        if self.runtime.is_main:
            state = {
                "config": self.config.to_dict(),
                "loader": self.loader.state_dict(),
                "val_loss": val_loss,
                "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
                "best_step": self.best_step,
                "tokens_per_step": self.tokens_per_step,
                "world_size": self.runtime.world_size,
                "history": self.history,
            }
            path = checkpoint.save(
                self.ckpt_root, self.step, model_state, optimizer_state, rng_states, state, self.data.tokenizer_dir()
            )
            keep = {self.best_step} if self.best_step is not None else set()
            checkpoint.prune(self.ckpt_root, self.config.training.keep_last, keep)
            log.debug(f"saved {path}")
        if self.runtime.distributed:
            dist.barrier()

    def _resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = checkpoint.latest(self.ckpt_root)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {self.ckpt_root}; start without --resume")
        ckpt = checkpoint.read_state(path)
        if ckpt.state["tokens_per_step"] != self.tokens_per_step:
            raise ValueError(
                f"{path} was trained with {ckpt.state['tokens_per_step']} tokens per step, this run has "
                f"{self.tokens_per_step}; resume with the same batch settings"
            )
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(self.raw_model, checkpoint.load_model_state(path), options=options)
        optimizer_state = checkpoint.load_tensors(path, "optimizer.pt")
        scaler_state = optimizer_state.pop("grad_scaler", None)
        set_optimizer_state_dict(self.raw_model, self.optimizer, optimizer_state, options=options)
        if self.scaler is not None and scaler_state is not None:
            self.scaler.load_state_dict(scaler_state)
        rng_states = checkpoint.load_tensors(path, "rng.pt")
        rng = rng_states[self.runtime.rank] if self.runtime.rank < len(rng_states) else rng_states[0]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.runtime.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.runtime.device)
        self.loader.load_state_dict(ckpt.state["loader"])
        self.step = ckpt.step
        self.best_val_loss = ckpt.state["best_val_loss"] if ckpt.state["best_val_loss"] is not None else math.inf
        self.best_step = ckpt.state["best_step"]
        self.history = ckpt.state.get("history", [])
        if self.runtime.is_main:
            self._truncate_metrics(self.step)
            log.info(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------------------------------------------------------
    # What a person sees and keeps.

    def _log_start(self) -> None:
        m, t = self.config.model, self.config.training
        log.info(f"run folder: {self.run_dir}; config: {json.dumps(self.config.to_dict())}")
        log.info(
            f"model: {self.raw_model.num_params():,} parameters; data: {self.data.data_dir} "
            f"({len(self.data.train):,} train / {len(self.data.val):,} val tokens, tokenizer "
            f"{self.data.manifest['tokenizer']['name']})"
        )
        log.info(
            f"{self.tokens_per_step:,} tokens per step = micro-batch {t.batch_size} x {m.context_length} x "
            f"{self.runtime.world_size} rank(s) x {self.accumulation} accumulation; steps {self.step} -> {t.max_steps}"
        )

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.training.max_steps,
            initial=self.step,
            unit="step",
            desc="training",
            disable=not self.runtime.is_main or not sys.stderr.isatty(),  # in a log file: the log lines only
            dynamic_ncols=True,
        )

    def _format(self, record: dict) -> str:
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

    def _write_metrics(self, record: dict) -> None:
        if not self.runtime.is_main:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            self._tensorboard = _tensorboard_writer(self.run_dir)
        if self._tensorboard:
            for key, value in record.items():
                if key != "step":
                    self._tensorboard.add_scalar(key, value, record["step"])

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, forget what was logged after the checkpoint (the run repeats those steps)."""
        if not self.metrics_file.is_file():
            return
        lines = self.metrics_file.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and _line_step(line) <= step]
        self.metrics_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _plot(self) -> None:
        """loss.png in the run folder: train loss per step and val loss per evaluation."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        train = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if '"train_loss"' in line]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="train", linewidth=0.8)
        ax.plot([r["step"] for r in self.history], [r["val_loss"] for r in self.history], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.set_title(f"{self.run_dir.name}: best val loss {self.best_val_loss:.4f}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png", dpi=100)
        plt.close(fig)


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


def fit_steps_to_budget(trainer: Trainer, minutes: float, calibration_steps: int = 5) -> TrainingConfig:
    """max_steps (and warm-up, in proportion) such that training fits `minutes` of wall time.

    Times `calibration_steps` real steps (median) after two warm-up steps, and one evaluation, then puts model,
    optimizer, loader and RNG back as they were, so the run itself is not changed by the measurement. The
    trainer re-fits max_steps once, at step REFIT_STEP, from the step times it has seen by then.
    """
    import copy

    t = trainer.config.training
    model_state = copy.deepcopy(trainer.raw_model.state_dict())
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    loader_state, rng_state = trainer.loader.state_dict(), torch.get_rng_state()
    budget_started = time.perf_counter()
    for _ in range(2):  # warm-up: allocations, kernel selection, compilation
        trainer._train_step()
    step_seconds = statistics.median(trainer._train_step()["dt_ms"] / 1000 for _ in range(calibration_steps))
    started = time.perf_counter()
    trainer.evaluate()
    eval_seconds = time.perf_counter() - started
    trainer.raw_model.load_state_dict(model_state)
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.loader.load_state_dict(loader_state)
    torch.set_rng_state(rng_state)
    trainer.budget = Budget(deadline=budget_started + minutes * 60, eval_seconds=eval_seconds)
    steps = trainer.budget.steps_left(step_seconds, t.eval_every, time.perf_counter())
    if trainer.runtime.distributed:  # every rank must run the same number of steps
        value = torch.tensor([steps], device=trainer.runtime.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        steps = int(value.item())
    warmup = min(t.warmup_steps, max(0, round(steps * t.warmup_steps / t.max_steps)))
    log.info(
        f"time budget {minutes:g} min: {step_seconds * 1000:.0f} ms/step, {eval_seconds:.1f} s/eval -> "
        f"max_steps {steps}, warmup_steps {warmup}"
    )
    return replace(t, max_steps=steps, warmup_steps=warmup, time_budget=0.0)
