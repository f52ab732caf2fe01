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
        log (on a GPU: once the next step is queued); every eval_every: val loss / perplexity / bits per byte;
        sample; checkpoint

Each cadence has an owner: the runtime (runtime.py) knows the device, precision and ranks, the checkpointer
(checkpoint.py) saves and resumes, the metrics logger (metrics.py) shows and keeps the records, and a time
budget (budget.py) may fit max_steps to the minutes given. `gpt2scratch.run.train` puts them together.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gpt2scratch.budget import TimeBudget
from gpt2scratch.checkpoint import Checkpointer, step_dir
from gpt2scratch.config import Config, Sampling, TrainingConfig, due
from gpt2scratch.dataset.data_module import DataModule
from gpt2scratch.dataset.tokenizer import Tokenizer
from gpt2scratch.estimates import flops_per_token
from gpt2scratch.evaluation import Validator
from gpt2scratch.generation import generate
from gpt2scratch.metrics import MetricsLogger, format_record
from gpt2scratch.models import GPT
from gpt2scratch.runtime import Runtime, all_reduce, cpu_bf16_is_emulated, shard, wrap

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run stops
STOP_CHECK_EVERY = 16  # with reads deferred, ranks agree on a Ctrl-C every this many steps (a check waits for all)


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, out of memory); the message says what to change."""


@dataclass
class QueuedStep:
    """An optimizer update taken (queued on the device): its figures are read by Trainer.finish_step."""

    step: int
    lr: float
    started: float  # time.perf_counter() when it began
    figures: Readback  # loss, gradient norm


@dataclass(frozen=True)
class Schedule:
    """The run's length and learning rates: the config's, or max_steps and warm-up fitted to a time budget."""

    max_steps: int
    warmup_steps: int
    max_lr: float
    min_lr: float
    schedule: str = "cosine"
    decay_fraction: float = 0.2

    @classmethod
    def from_training(cls, t: TrainingConfig) -> Schedule:
        return cls(t.max_steps, t.warmup_steps, t.max_lr, t.min_lr, t.schedule, t.decay_fraction)


def lr_at(step: int, schedule: Schedule | TrainingConfig) -> float:
    """The seed's schedule: linear warm-up to max_lr over warmup_steps, cosine decay to min_lr at max_steps.
    `wsd` (warm-up, stable, decay, as the speedruns use): max_lr after the warm-up until the last decay_fraction
    of the steps, then linear to 0 at max_steps."""
    s = schedule
    if step < s.warmup_steps:
        return s.max_lr * (step + 1) / s.warmup_steps
    if s.schedule == "wsd":
        decay_steps = s.max_steps - decay_start(s)
        return s.max_lr * min(1.0, max(0.0, (s.max_steps - step) / decay_steps))
    if step >= s.max_steps or s.max_steps == s.warmup_steps:
        return s.min_lr
    decay_ratio = (step - s.warmup_steps) / (s.max_steps - s.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return s.min_lr + coeff * (s.max_lr - s.min_lr)


def decay_start(schedule: Schedule | TrainingConfig) -> int:
    """`wsd`: the last step at max_lr; the learning rate falls linearly from there to 0 at max_steps."""
    return schedule.max_steps - max(1, round(schedule.decay_fraction * schedule.max_steps))


def configure_optimizers(model: torch.nn.Module, training: TrainingConfig, device: torch.device) -> list:
    """[AdamW] (configure_optimizer), or for `--optimizer muon`: [Muon for the blocks' weight matrices, AdamW for
    the rest]. Muon (PyTorch's; see Muon below) orthogonalises each matrix's momentum (Newton-Schulz); with
    "match_rms_adamw" its update has AdamW's RMS, so it takes AdamW's learning rate and weight decay (muon_lr 0 =
    max_lr). Each group's `lr_scale` is its peak over max_lr: the schedule sets lr = lr_at(step) x lr_scale."""
    if training.optimizer == "adamw":
        return [configure_optimizer(model, training, device)]
    matrices = [p for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("transformer.h.")]
    chosen = {id(p) for p in matrices}
    muon_lr = training.muon_lr or training.max_lr
    fp32 = device.type == "cpu" and cpu_bf16_is_emulated()
    muon = Muon(matrices, lr=muon_lr, weight_decay=training.weight_decay, adjust_lr_fn="match_rms_adamw", fp32=fp32)
    muon.param_groups[0]["lr_scale"] = muon_lr / training.max_lr
    return [muon, configure_optimizer(model, training, device, exclude=chosen)]


class Muon(torch.optim.Muon):
    """torch.optim.Muon, whose Newton-Schulz iteration runs in bf16; with fp32=True it runs in fp32 instead, for
    CPUs that emulate bf16 (x86 without avx512_bf16 or AMX), where the iteration's bf16 products are several
    times slower than fp32's: the `cpu` preset's 16 matrices took 55 ms a step in bf16 and 15 ms in fp32 on a
    2-core Xeon with AVX-512 only (2026-12-06), and that preset's whole step 550 -> 510 ms. The same update
    otherwise (momentum, Nesterov, the quintic iteration's coefficients and steps, the learning-rate adjustment,
    decoupled weight decay); fp32=False is PyTorch's step itself."""

    def __init__(self, params, *, fp32: bool = False, **kwargs):
        super().__init__(params, **kwargs)
        self.fp32 = fp32

    @torch.no_grad()
    def step(self, closure=None):
        if not self.fp32:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz_fp32(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * _muon_lr_ratio(group["adjust_lr_fn"], param.shape))
        return loss


def newton_schulz_fp32(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """The orthogonalisation of torch.optim.Muon (the quintic Newton-Schulz iteration on the matrix scaled to a
    Frobenius norm of 1, the wide way round), in fp32."""
    a, b, c = coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment for a (A, B) matrix."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """`clip_grad_norm_(parameters, max_norm)`, returning the norm before clipping as a float, without the pass
    that multiplies every gradient by 1 when the norm is within max_norm (clip_grad_norm_ scales by its clamped
    coefficient either way: ~25 ms of GPT-2 124M's CPU step). The same gradients bit for bit. max_norm None or 0:
    the norm only."""
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    value = total.full_tensor() if hasattr(total, "full_tensor") else total  # FSDP2: a DTensor
    if max_norm and (max_norm / (value + 1e-6)).item() < 1.0:  # clip_grad_norm_'s coefficient, before its clamp
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return value.item()


class Readback:
    """A few device values on their way to the host: the copy is queued behind the work that computes them, and
    `values()` waits for that copy alone (a CUDA event), not for the work queued after it."""

    def __init__(self, values: torch.Tensor):
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def is_bad_step(loss: float, grad_norm: float, scaler: torch.amp.GradScaler) -> bool:
    """A step whose update is skipped: a non-finite loss, or gradient norm (with fp16's scaler, non-finite
    gradients are the scaler's to handle: it skips those updates and lowers its scale by itself)."""
    return not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm))


def can_update_unread(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler) -> bool:
    """Whether update() can skip a non-finite step without reading anything: fused AdamW takes the skip as a
    device flag (found_inf, as GradScaler gives it fp16 steps); Muon, foreach AdamW and the scaler's own found_inf
    cannot."""
    fused = all(isinstance(o, torch.optim.AdamW) and o.defaults.get("fused") for o in optimizers)
    return fused and not scaler.is_enabled()


def update(
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    parameters: list[torch.nn.Parameter],
    loss: torch.Tensor,
    max_norm: float | None,
    read: bool = True,
) -> Readback:
    """The update of a training step: unscale (fp16), clip the gradient norm at max_norm, step the optimizers,
    skipped where the loss or the norm is not finite (is_bad_step). Returns the loss and the norm before clipping.

    read: read them at once (a host sync: free on a CPU, where it lets clip_gradients skip a pass). Otherwise
    (can_update_unread) nothing is read: the clipping scales by its clamped coefficient on the device and the
    skip is fused AdamW's found_inf flag, so the host can queue the next step while the device runs this one
    (on an H200, reading at once left the GPU idle ~6 ms of a 39 ms GPT-2 step). The same weights bit for bit:
    the clamped coefficient is 1.0 exactly where clip_gradients skips its pass."""
    for optimizer in optimizers:
        scaler.unscale_(optimizer)
    if not read:
        total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        found_inf = (~(torch.isfinite(loss) & torch.isfinite(total))).float()
        for optimizer in optimizers:
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        return Readback(torch.stack([loss.float(), total.float()]))
    grad_norm = clip_gradients(parameters, max_norm)
    value = loss.item()
    if not is_bad_step(value, grad_norm, scaler):
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
    return Readback(torch.tensor([value, grad_norm], dtype=torch.float64))


def configure_optimizer(
    model: torch.nn.Module, training: TrainingConfig, device: torch.device, exclude: set[int] = frozenset()
):
    """AdamW; weight decay on matrices (dim >= 2: linear weights, embeddings), not on biases and LayerNorm."""
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": training.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=training.max_lr, betas=(training.beta1, training.beta2), eps=1e-8)
    if training.fused_adamw and device.type in ("cuda", "cpu"):
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


class Trainer:
    def __init__(
        self,
        config: Config,
        run_dir: str | Path,
        runtime: Runtime,
        data: DataModule,
        resume: bool | str | Path = False,
        init_weights: dict[str, torch.Tensor] | None = None,
    ):
        self.config, self.runtime, self.data = config, runtime, data
        self.run_dir = Path(run_dir)
        t, m = config.training, config.model
        micro_tokens = t.batch_size * m.context_length * runtime.world_size
        if t.tokens_per_step and t.tokens_per_step % micro_tokens:
            raise ValueError(
                f"tokens_per_step ({t.tokens_per_step}) must be a multiple of batch_size x context_length x ranks "
                f"({t.batch_size} x {m.context_length} x {runtime.world_size} = {micro_tokens}); "
                f"e.g. --tokens-per-step {micro_tokens * max(1, round(t.tokens_per_step / micro_tokens))}"
            )
        self.accumulation = t.tokens_per_step // micro_tokens if t.tokens_per_step else 1
        self.tokens_per_step = micro_tokens * self.accumulation
        self.schedule = Schedule.from_training(t)
        peak = runtime.peak_flops()  # MFU = tokens/s x FLOPs per token / peak FLOP/s (None: no MFU)
        self.flops_per_peak = None if peak is None else flops_per_token(config.model) / peak
        self.budget: TimeBudget | None = None  # set by fit() when the run has a time budget

        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.raw_model = GPT(config.model, pad_vocab=t.pad_vocab).to(runtime.device)
        self.raw_model.activation_checkpointing = t.activation_checkpointing
        if init_weights is not None:  # fine-tuning: start from these weights (a tied head follows wte)
            self.raw_model.load_state_dict(init_weights)
        shard(self.raw_model, runtime, t.fsdp)
        if t.optimizer == "muon" and t.fsdp:
            raise ValueError(
                "--optimizer muon needs each weight matrix whole, and FSDP2 shards them across ranks: use DDP "
                "(leave out --fsdp) or --optimizer adamw"
            )
        self.optimizers = configure_optimizers(self.raw_model, t, runtime.device)
        self.scaler = runtime.grad_scaler()
        # On a GPU a step's loss and gradient norm are read after the next step is queued, so the GPU never waits
        # for the host between steps (FSDP2 reads at once: its norm is a DTensor)
        self.defer_reads = runtime.device.type == "cuda" and not t.fsdp
        self.defer_reads &= can_update_unread(self.optimizers, self.scaler)
        self._last_finished = 0.0  # time.perf_counter() when the last step's figures were read
        self.loader = data.train_loader()
        self.tokenizer = Tokenizer(data.tokenizer_dir())
        self.checkpointer = Checkpointer(self.run_dir, runtime, t.save_every, t.keep_last, data.tokenizer_dir())
        self.metrics = MetricsLogger(self.run_dir, runtime.is_main)
        self.validator = Validator(t, data.val, self.tokenizer, runtime)
        self.step = 0  # optimizer updates done
        self.best_val_loss, self.best_step = math.inf, None
        self.bad_steps = 0
        self.evals_without_improvement = 0  # for early_stop
        self.cooldown_step: int | None = None  # wsd: where early_stop began the decay (the run stops after it)
        self.stopped_early = False
        self.history: list[dict] = []  # eval records, for the plot and the checkpoints
        if runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume(None if resume is True else resume)
        else:
            torch.manual_seed(t.seed + runtime.rank)  # dropout masks differ per rank
        self.compiled = runtime.compile
        self.model = wrap(self.raw_model, runtime, t.fsdp, self.compiled)
        self._stop_requested = False

    # ------------------------------------------------------------------------------------------------------------------
    # The loop.

    def fit(self, budget: TimeBudget | None = None) -> dict:
        """Train to max_steps (fitted to `budget` if given); returns the step reached and the last val figures."""
        t = self.config.training
        if budget is not None:
            self.budget = budget
            self.schedule = replace(self.schedule, max_steps=budget.max_steps, warmup_steps=budget.warmup_steps)
        if self.runtime.is_main:
            self._write_run_config()
            self._log_start()
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        self.metrics.open(total=self.schedule.max_steps, initial=self.step)
        last_eval: dict = {}
        started = time.perf_counter()
        queued: QueuedStep | None = None  # (defer_reads) the last step taken, its figures not read yet
        try:
            while self.step < self.schedule.max_steps and not self._should_stop():
                taken = self.queue_step()
                if queued is not None:  # the step before, which the device ran while this one was queued
                    self._log_step(self.finish_step(queued))
                self.step += 1
                queued = taken
                if self.defer_reads and not self._host_work_due():
                    continue
                self._log_step(self.finish_step(queued))
                queued = None
                last = self.step == self.schedule.max_steps
                if self.validator.due(self.step, last):
                    eval_started = time.perf_counter()
                    last_eval = self.evaluate()
                    if self.budget is not None:
                        self.budget.record_eval(time.perf_counter() - eval_started)
                    self._record_eval(last_eval)
                    if t.early_stop and self.evals_without_improvement >= t.early_stop and not last:
                        if self._stable_phase():
                            self._cool_down()
                        else:
                            self._stop_early()
                            last = True
                if due(t.sample_every, self.step, last):
                    for text in self.sample():
                        self.metrics.print(f"--- sample at step {self.step} ---\n{text}")
                # with early stop, each new best is saved too: the run exports the best weights if it stops early
                keep_best = bool(t.early_stop) and self.best_step == self.step  # (an evaluation now improved)
                if (self.checkpointer.due(self.step, last) or keep_best) and self.bad_steps == 0:
                    # (not while updates are being skipped: the last checkpoint stays the last good one)
                    self.save_checkpoint(last_eval.get("val_loss") if last_eval.get("step") == self.step else None)
            if queued is not None:  # (stopped by Ctrl-C)
                self._log_step(self.finish_step(queued))
            if self._stop_requested:
                self.metrics.print(f"interrupted: saving a checkpoint at step {self.step}")
                self.save_checkpoint(None)
            if self.runtime.is_main:  # (the time budget's refits and early stopping move max_steps)
                self._write_run_config()
        finally:
            self.metrics.close()
            signal.signal(signal.SIGINT, previous_handler)
        return {
            "step": self.step,
            "minutes": (time.perf_counter() - started) / 60,
            "interrupted": self._stop_requested,
            "stopped_early": self.stopped_early,
            **{k: v for k, v in last_eval.items() if k.startswith("val_")},
        }

    def train_step(self) -> dict:
        """One optimizer update (not counted in self.step: fit does that); returns the step's record."""
        return self.finish_step(self.queue_step())

    def queue_step(self) -> QueuedStep:
        """One optimizer update, queued on the device (with defer_reads, nothing is read back yet)."""
        t, runtime = self.config.training, self.runtime
        started = time.perf_counter()
        self.model.train()
        lr = lr_at(self.step, self.schedule)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=runtime.device)
        for micro_step in range(self.accumulation):
            x, y = runtime.to_device(*self.loader.next_batch())
            with self._gradient_sync(micro_step == self.accumulation - 1), runtime.autocast():
                _, loss = self._forward(x, y)
            loss = loss / self.accumulation
            loss_sum += loss.detach()
            self.scaler.scale(loss).backward()
        if runtime.distributed:
            all_reduce(loss_sum)
            loss_sum /= runtime.world_size
        parameters = list(self.raw_model.parameters())
        figures = update(self.optimizers, self.scaler, parameters, loss_sum, t.grad_clip, read=not self.defer_reads)
        self._zero_grad()
        return QueuedStep(self.step + 1, lr, started, figures)

    def finish_step(self, queued: QueuedStep) -> dict:
        """Read a queued step's figures (waiting for the device to finish it) and count a skipped update; returns
        the step's record. Its time runs from its start, or from the previous step's reading if that came later
        (deferred reads: the steps overlap, and each is timed from the reading before it)."""
        train_loss, grad_norm = queued.figures.values()
        finished = time.perf_counter()
        dt = finished - max(queued.started, self._last_finished)
        self._last_finished = finished
        if is_bad_step(train_loss, grad_norm, self.scaler):
            self._skip_step(queued.step, train_loss, grad_norm)
        else:
            self.bad_steps = 0
        record = {
            "step": queued.step,
            "train_loss": train_loss,
            "lr": queued.lr,
            "grad_norm": grad_norm,
            "tokens": queued.step * self.tokens_per_step,
            "dt_ms": dt * 1000,
            "tokens_per_sec": self.tokens_per_step / dt,
        }
        if self.flops_per_peak is not None:
            record["mfu"] = record["tokens_per_sec"] * self.flops_per_peak
        return record

    def _log_step(self, record: dict) -> None:
        step = record["step"]
        self.metrics.log_step(record)
        if self.budget is not None:
            self.budget.record(record["dt_ms"] / 1000)
            if self._refit_due():
                self._refit(self.budget)
        if due(self.config.training.log_every, step) or step == 1:
            self.metrics.print(format_record(record))

    def _host_work_due(self) -> bool:
        """Whether this step (just taken) is followed by work that needs its figures or its weights before the next
        step: an evaluation, samples, a checkpoint, the time budget's refit, the last step."""
        t, step = self.config.training, self.step
        last = step == self.schedule.max_steps
        if last or self._refit_due():
            return True
        return self.validator.due(step, last) or due(t.sample_every, step, last) or self.checkpointer.due(step, last)

    def _forward(self, x: torch.Tensor, y: torch.Tensor):
        try:
            return self.model(x, y, return_logits=False)
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"out of memory with micro-batch {self.config.training.batch_size} x "
                f"{self.config.model.context_length}; use a smaller --batch-size (gradient accumulation keeps "
                "tokens_per_step) or a smaller model"
            ) from None
        except Exception as error:
            if not self.compiled or self.step > 0 or isinstance(error, ValueError):
                raise
            log.warning(f"torch.compile failed ({type(error).__name__}: {error}); continuing without it")
            self.compiled = False
            self.model = wrap(self.raw_model, self.runtime, self.config.training.fsdp, compile=False)
            self._zero_grad()
            return self.model(x, y, return_logits=False)

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        if not self.runtime.distributed:
            return contextlib.nullcontext()
        if self.config.training.fsdp:
            self.raw_model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def _skip_step(self, step: int, train_loss: float, grad_norm: float) -> None:
        self.bad_steps += 1
        log.warning(
            f"step {step}: loss {train_loss}, grad norm {grad_norm} is not finite; skipping this update "
            f"({self.bad_steps}/{MAX_BAD_STEPS} in a row)"
        )
        if self.bad_steps >= MAX_BAD_STEPS:
            raise TrainingError(
                f"{MAX_BAD_STEPS} non-finite losses in a row at step {step}: the run diverged. "
                f"The last checkpoint in {self.checkpointer.root} is intact; resume from it with a lower --max-lr"
            )

    def _stop_early(self) -> None:
        """The val loss has not improved for early_stop evaluations: end the run at this step (samples and the
        last checkpoint follow, as at max_steps)."""
        self.metrics.print(
            f"early stop at step {self.step}: val loss has not improved for {self.evals_without_improvement} "
            f"evaluations (best {self.best_val_loss:.4f} at step {self.best_step}); more steps would memorise"
        )
        self.schedule = replace(self.schedule, max_steps=self.step)
        self.metrics.set_total(self.step)
        self.stopped_early = True

    def _stable_phase(self) -> bool:
        """Whether the run is on a `wsd` schedule before its decay: there a val loss that has stopped improving
        is the plateau of the high learning rate, which the decay takes down, not yet memorisation (the gpu preset
        on an H200 with --early-stop 1: best 4.284 in the plateau, 4.291 at step 1,000, where the decay began;
        4.218 at its end, step 1,250)."""
        s = self.schedule
        plateau = s.schedule == "wsd" and s.decay_fraction < 1 and self.step <= decay_start(s)
        return plateau and self.cooldown_step is None

    def _cool_down(self) -> None:
        """Begin the `wsd` decay at this step, in place of an early stop in the plateau: the run is shortened so
        that its decay (decay_fraction of the steps) starts now, and early_stop counts again from here."""
        before, fraction = self.schedule.max_steps, self.schedule.decay_fraction
        max_steps = min(before, max(self.step + 1, round(self.step / (1 - fraction))))
        self.schedule = replace(self.schedule, max_steps=max_steps)
        self.metrics.set_total(max_steps)
        self.cooldown_step, self.evals_without_improvement = self.step, 0
        self.metrics.print(
            f"val loss has not improved for {self.config.training.early_stop} evaluations at the stable learning rate "
            f"(best {self.best_val_loss:.4f} at step {self.best_step}): the wsd decay starts now, to 0 at step "
            f"{max_steps} (max_steps {before} -> {max_steps}); early stop counts again from here"
        )

    def best_checkpoint(self) -> Path | None:
        """After an early stop, the checkpoint of the best val loss (saved when it was reached), if it is not the
        last step's: the weights to export, before the evaluations that did not improve."""
        if not self.stopped_early or self.best_step is None or self.best_step == self.step:
            return None
        path = step_dir(self.checkpointer.root, self.best_step)
        return path if path.is_dir() else None

    def _refit_due(self) -> bool:
        """The time budget's refits: once early on, then (wsd) while the learning rate is at its peak; none after
        early_stop began the decay."""
        if self.budget is None or self.cooldown_step is not None:
            return False
        return self.budget.refit_due(self.step, at_peak_lr=self._stable_phase())

    def _refit(self, budget: TimeBudget) -> None:
        before = self.schedule.max_steps
        at_least = 0
        if self._stable_phase():  # the decay may not start before this step: the learning rate would jump down
            at_least = self.step + 1
            while decay_start(replace(self.schedule, max_steps=at_least)) < self.step:
                at_least += 1
        self.schedule = replace(self.schedule, max_steps=budget.refit(self.step, at_least))
        self.metrics.set_total(self.schedule.max_steps)
        if abs(self.schedule.max_steps - before) >= max(1, before // 100):  # (later refits move it a little)
            self.metrics.print(
                f"time budget: {budget.median_step_seconds() * 1000:.0f} ms/step lately; "
                f"max_steps {before} -> {self.schedule.max_steps}"
            )

    def _should_stop(self) -> bool:
        """Ctrl-C on any rank stops every rank at the same step (else the others would wait in a collective)."""
        if not self.runtime.distributed:
            return self._stop_requested
        if self.defer_reads and self.step % STOP_CHECK_EVERY:
            return False  # (a rank's own Ctrl-C waits for the next check, where every rank learns of it)
        flag = torch.tensor([float(self._stop_requested)], device=self.runtime.device)
        self._stop_requested = bool(all_reduce(flag, "max").item())
        return self._stop_requested

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_requested = True

    @contextlib.contextmanager
    def rehearsal(self):
        """Steps and evaluations run inside leave no trace: weights, optimizer, loader and RNG are put back."""
        model_state = copy.deepcopy(self.raw_model.state_dict())
        optimizer_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in self.optimizers]
        loader_state, rng_state = self.loader.state_dict(), torch.get_rng_state()
        try:
            yield
        finally:
            self.raw_model.load_state_dict(model_state)
            for optimizer, state in zip(self.optimizers, optimizer_states, strict=True):
                optimizer.load_state_dict(state)
            self.loader.load_state_dict(loader_state)
            torch.set_rng_state(rng_state)

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation and samples.

    def evaluate(self) -> dict:
        """The validator's record at this step (val loss, perplexity, bits per byte; HellaSwag when due)."""
        return self.validator.run(self.raw_model, self.step)

    def _record_eval(self, record: dict) -> None:
        if record["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_step = record["val_loss"], record["step"]
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        self.history.append(record)
        self.metrics.log_eval(record, self.history, self.best_val_loss)

    def sample(self, num_samples: int = 2) -> list[str]:
        """Texts generated from <|endoftext|> with the config's sampling settings (max_new_token, k_top, ...)."""
        sampling = Sampling.from_training(self.config.training)
        generator = torch.Generator(device=self.runtime.device).manual_seed(self.config.training.seed + self.step)
        prompt = torch.full((num_samples, 1), self.tokenizer.eot_id, dtype=torch.long, device=self.runtime.device)
        with self.runtime.autocast():
            out = generate(
                self.raw_model,
                prompt,
                sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                eot_id=self.tokenizer.eot_id,
                generator=generator,
            )
        return [self.tokenizer.decode([i for i in row[1:].tolist() if i != self.tokenizer.eot_id]) for row in out]

    # ------------------------------------------------------------------------------------------------------------------
    # Checkpoints and the run's record.

    def run_config(self) -> Config:
        """The config as this run executes it: max_steps and warm-up as fitted to a time budget (then spent)."""
        t = self.config.training
        # (an early stop inside the warm-up ends the run before the warm-up's end: the config must still be valid)
        max_steps = self.schedule.max_steps
        fitted = replace(t, max_steps=max_steps, warmup_steps=min(self.schedule.warmup_steps, max_steps))
        if self.budget is not None:
            fitted = replace(fitted, time_budget=0.0)
        return replace(self.config, training=fitted)

    def _write_run_config(self) -> None:
        (self.run_dir / "run_config.json").write_text(json.dumps(self.run_config().to_dict(), indent=2) + "\n")

    def save_checkpoint(self, val_loss: float | None) -> None:
        if not self._weights_finite():  # never overwrite the last good checkpoint with a diverged model
            raise TrainingError(
                f"the weights are not finite at step {self.step}: the run diverged, and no checkpoint was written. "
                f"The last checkpoint in {self.checkpointer.root} is intact; resume from it with a lower --max-lr"
            )
        state = {
            "config": self.run_config().to_dict(),
            "loader": self.loader.state_dict(),
            "val_loss": val_loss,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_step": self.best_step,
            "cooldown_step": self.cooldown_step,
            "tokens_per_step": self.tokens_per_step,
            "world_size": self.runtime.world_size,
            "history": self.history,
        }
        self.checkpointer.save(self.step, self.raw_model, self.optimizers, self.scaler, state, self.best_step)

    def _weights_finite(self) -> bool:
        """Every weight finite, on every rank (each checks its own shard under FSDP)."""
        bad = torch.zeros((), device=self.runtime.device)
        with torch.no_grad():
            for param in self.raw_model.parameters():
                local = param.to_local() if hasattr(param, "to_local") else param
                bad += (~torch.isfinite(local)).any()
        return all_reduce(bad, "max").item() == 0

    def _resume(self, path: str | Path | None) -> None:
        """Continue from checkpoint `path` (None: the run's latest)."""
        ckpt = self.checkpointer.find(path)
        if ckpt.state["tokens_per_step"] != self.tokens_per_step:
            raise ValueError(
                f"{ckpt.path} was trained with {ckpt.state['tokens_per_step']} tokens per step, this run has "
                f"{self.tokens_per_step}; resume with the same batch settings"
            )
        self.checkpointer.restore(ckpt, self.raw_model, self.optimizers, self.scaler)
        self.loader.load_state_dict(ckpt.state["loader"])
        self.step = ckpt.step
        self.best_val_loss = ckpt.state["best_val_loss"] if ckpt.state["best_val_loss"] is not None else math.inf
        self.best_step = ckpt.state["best_step"]
        self.history = ckpt.state.get("history", [])
        self.cooldown_step = ckpt.state.get("cooldown_step")  # (absent from checkpoints before it)
        counted_from = max(self.best_step or 0, self.cooldown_step or 0)
        self.evals_without_improvement = sum(1 for r in self.history if r["step"] > counted_from)
        self.metrics.truncate(self.step)
        if self.runtime.is_main:
            log.info(f"resumed from {ckpt.path} at step {self.step}")

    def _log_start(self) -> None:
        m, t = self.config.model, self.config.training
        log.info(f"run folder: {self.run_dir}; config: {json.dumps(self.run_config().to_dict())}")
        log.info(
            f"model: {self.raw_model.num_params():,} parameters; data: {self.data.data_dir} "
            f"({len(self.data.train):,} train / {len(self.data.val):,} val tokens, tokenizer "
            f"{self.data.manifest['tokenizer']['name']})"
        )
        log.info(
            f"{self.tokens_per_step:,} tokens per step = micro-batch {t.batch_size} x {m.context_length} x "
            f"{self.runtime.world_size} rank(s) x {self.accumulation} accumulation; "
            f"steps {self.step} -> {self.schedule.max_steps}; {t.optimizer}, {t.schedule} schedule"
        )
