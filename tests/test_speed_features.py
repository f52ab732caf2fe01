"""The training speed switches (padded vocabulary, activation checkpointing, torch.compile, fp16 with a gradient
scaler, bf16, fused AdamW, MFU, early stop), each checked against the plain path it replaces.

Tests parametrized over DEVICES run on the CPU everywhere and on CUDA where a GPU is present (`cuda` marker:
conftest deselects them on a machine without one; `bench/gpu_check.sh` runs them on a GPU). The CUDA-only tests
at the end cover what only a GPU run shows: a bit-exact resume there, the KV cache in bf16, and the commands.
"""

import json
import os
import platform
import subprocess
import sys
import urllib.request

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from gpt2scratch import checkpoint
from gpt2scratch.config import Config, GPTConfig, TrainingConfig, resolve_config
from gpt2scratch.dataset.data_module import DataModule
from gpt2scratch.generation import generate_ids
from gpt2scratch.hf import export_folder
from gpt2scratch.models import GPT
from gpt2scratch.runtime import Runtime, setup_runtime
from gpt2scratch.testing import ServerProcess, copy_checkpoint, read_metrics, run_cli, same_weights
from gpt2scratch.testing import read_metrics as losses
from gpt2scratch.trainer import Trainer, lr_at

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def make_config(data_dir, vocab_size=512, drop_rate=0.0, **training) -> Config:
    config = resolve_config("tiny", overrides={"data": {"dir": str(data_dir)}})
    model = GPTConfig(**{**config.model.__dict__, "vocab_size": vocab_size, "drop_rate": drop_rate})
    values = dict(tokens_per_step=0, batch_size=4, warmup_steps=2, max_steps=8, eval_every=0, sample_every=0)
    values.update(training)
    return Config(model, TrainingConfig(**values), config.data)


def train(config: Config, run_dir, resume=False) -> tuple[Trainer, list[float]]:
    """Train in this process (on config.training.device) and return the trainer and its losses."""
    runtime = setup_runtime(config.training)
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    trainer = Trainer(config, run_dir, runtime, data, resume=resume)
    trainer.fit()
    return trainer, list(losses(run_dir).values())


def model_config(**overrides) -> GPTConfig:
    values = dict(vocab_size=1000, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    return GPTConfig(**{**values, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# The padded vocabulary.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_tying", [False, True])
def test_padded_vocabulary_gives_the_unpadded_logits_and_weights(device, weight_tying):
    torch.backends.cuda.matmul.allow_tf32 = False  # (a training run in this process may have turned it on)
    config = model_config(weight_tying=weight_tying)
    torch.manual_seed(0)
    plain = GPT(config).to(device).eval()
    torch.manual_seed(0)
    padded = GPT(config, pad_vocab=64).to(device).eval()
    assert padded.lm_head.weight.shape == (1024, 64) and padded.transformer.wte.weight.shape == (1024, 64)
    assert padded.num_params() == plain.num_params()
    a, b = plain.state_dict(), padded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same init, vocab_size rows
    x = torch.randint(0, 1000, (3, 32), device=device)
    y = torch.randint(0, 1000, (3, 32), device=device)
    (plain_logits, plain_loss), (padded_logits, padded_loss) = plain(x, y), padded(x, y)
    assert padded_logits.shape == (3, 32, 1000)
    assert_close(padded_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert_close(padded_loss, plain_loss, rtol=1e-5, atol=1e-5)
    padded_loss.backward()  # the padding rows get no gradient: they stay zero under AdamW
    assert padded.lm_head.weight.grad[1000:].abs().sum() == 0
    assert padded.transformer.wte.weight.grad[1000:].abs().sum() == 0
    reloaded = GPT(config, pad_vocab=64).to(device)
    reloaded.load_state_dict(a)
    assert torch.equal(reloaded.lm_head.weight[1000:], torch.zeros(24, 64, device=device))
    assert (reloaded.lm_head.weight is reloaded.transformer.wte.weight) == weight_tying


def test_training_with_a_padded_vocabulary_exports_what_the_unpadded_one_does(hamlet_data, tmp_path):
    """515 tokens (not a multiple of 64): padded to 576 for the matmuls; losses, checkpoint and HF export are the
    unpadded run's."""
    runs = {}
    for pad in (1, 64):
        config = make_config(hamlet_data, vocab_size=515, pad_vocab=pad, drop_rate=0.1)
        trainer, run_losses = train(config, tmp_path / f"pad{pad}")
        assert trainer.raw_model.padded_vocab_size == (576 if pad == 64 else 515)
        state = checkpoint.load_model_state(tmp_path / f"pad{pad}" / "ckpt" / "step_000008")
        assert state["lm_head.weight"].shape == (515, 64)
        hf = export_folder(state, config.model, trainer.data.tokenizer_dir(), tmp_path / f"hf{pad}")
        runs[pad] = run_losses, state, (hf / "model.safetensors").read_bytes()
    assert_close(runs[64][0], runs[1][0], rtol=1e-5, atol=1e-5)
    assert all(torch.allclose(runs[64][1][k], runs[1][1][k], rtol=1e-4, atol=1e-6) for k in runs[1][1])
    plain_export = export_folder(runs[1][1], config.model, trainer.data.tokenizer_dir(), tmp_path / "again")
    assert (plain_export / "model.safetensors").read_bytes() == runs[1][2]  # the export itself is deterministic


# ----------------------------------------------------------------------------------------------------------------------
# The LM head and the loss in one function (what training runs: return_logits=False).


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("weight_tying", [False, True])
def test_fused_loss_gives_the_plain_loss_and_gradients(device, precision, weight_tying, monkeypatch):
    """Against F.cross_entropy over the logits, same weights and autocast: a padded vocabulary, ignored targets, a
    loss scaled as gradient accumulation scales it, and a vocabulary of several softmax blocks."""
    from gpt2scratch.models import linear_cross_entropy

    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(linear_cross_entropy, "BLOCK_ELEMENTS", 7 * 1000)  # 96 rows: 13 blocks of 7, one of 5
    config = model_config(weight_tying=weight_tying)
    x = torch.randint(0, 1000, (3, 32), device=device)
    y = torch.randint(0, 1000, (3, 32), device=device)
    y[1, 5:9] = -100  # IGNORE_INDEX: not counted in the mean
    results = []
    for return_logits in (True, False):
        torch.manual_seed(0)
        model = GPT(config, pad_vocab=64).to(device).train()
        with torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
            logits, loss = model(x, y, return_logits=return_logits)
        assert (logits is None) == (not return_logits)
        (loss * 0.25).backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert model.lm_head.weight.grad[1000:].abs().sum() == 0  # the padding rows get no gradient
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    tolerance = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-4)
    assert_close(fused_loss, plain_loss, **tolerance)
    for name in plain_grads:
        assert_close(fused_grads[name], plain_grads[name], **tolerance, msg=name)


@settings(max_examples=60, deadline=None)
@example(rows=1, vocab=9, padding=0, block_rows=1, ignored=0.0, scale=3.0, seed=5, dtype=torch.bfloat16)
@given(
    rows=st.integers(1, 40),
    vocab=st.integers(2, 70),
    padding=st.integers(0, 9),
    block_rows=st.integers(1, 12),
    ignored=st.floats(0.0, 0.9),
    scale=st.sampled_from([1.0, 0.25, 3.0]),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float64, torch.bfloat16]),
)
def test_fused_loss_equals_cross_entropy_on_any_shape(rows, vocab, padding, block_rows, ignored, scale, seed, dtype):
    """linear_cross_entropy against F.cross_entropy: any number of rows, vocabulary, padding rows, block size and
    share of ignored targets (all of them ignored: both give nan). In fp64 (the softmax in place), and in bf16
    (each block's softmax in an fp32 block) against F.cross_entropy over the bf16 logits in fp32."""
    import torch.nn.functional as F

    from gpt2scratch.models import linear_cross_entropy as lce

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab + padding, 8, dtype=torch.float64, generator=generator).to(dtype)
    weight[vocab:] = 0
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[torch.rand(rows, generator=generator) < ignored] = -100
    original = lce.BLOCK_ELEMENTS
    lce.BLOCK_ELEMENTS = block_rows * vocab
    try:
        fused = lce.linear_cross_entropy(x, weight, targets, vocab)
    finally:
        lce.BLOCK_ELEMENTS = original
    plain = F.cross_entropy(F.linear(x, weight)[:, :vocab].to(fused.dtype), targets, ignore_index=-100)
    if bool((targets == -100).all()):
        assert fused.isnan() and plain.isnan()
        return
    ours = torch.autograd.grad(fused * scale, (x, weight))
    theirs = torch.autograd.grad(plain * scale, (x, weight))
    assert ours[1][vocab:].abs().sum() == 0
    if dtype == torch.float64:
        assert_close(fused, plain, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours, theirs, strict=True):
            assert_close(a, b, rtol=1e-10, atol=1e-12)
        return
    # bf16: the loss to fp32 rounding; each gradient within the sum of its terms' errors: a few bf16 roundings
    # (2^-8 relative) of each logit's gradient (the two round it, and apply the scale, at different points), plus
    # the fp32 softmax's own rounding (2^-24 of 1, which shows where a probability is near 1)
    assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    counted = targets != -100
    logits = F.linear(x.double(), weight.double())[:, :vocab]
    grad_logits = (logits.softmax(-1) - F.one_hot(targets.clamp(min=0), vocab)).abs()
    error = (2**-6 * grad_logits + 2**-21) * (counted / counted.sum())[:, None] * scale
    bounds = error @ weight.double()[:vocab].abs(), F.pad(error.T @ x.double().abs(), (0, 0, 0, padding))
    for a, b, bound in zip(ours, theirs, bounds, strict=True):
        assert ((a.double() - b.double()).abs() <= bound).all(), (a, b, bound)


def test_fused_loss_leaves_fp16_to_the_plain_path():
    """fp16 needs the loss scaler's scaling before its tiny logit gradients are rounded: the plain path runs."""
    from gpt2scratch.models.linear_cross_entropy import fusable

    x = torch.randn(4, 8)
    assert fusable(x)
    with torch.autocast("cpu", torch.bfloat16):
        assert fusable(x)
    with torch.autocast("cpu", torch.float16):
        assert not fusable(x)


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing, compile, precisions.


@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing_gives_the_same_gradients(device):
    """With dropout on: the recomputed forward pass replays the same dropout masks."""
    config = model_config(drop_rate=0.1, n_layers=3)
    x = torch.randint(0, 1000, (2, 32), device=device)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(config).to(device).train()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)
        _, loss = model(x, x)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_matches_eager(device, hamlet_data, tmp_path):
    """torch.compile of the model (inductor; on a CPU it generates C++) gives the eager run's losses."""
    settings = dict(device=device, precision="fp32", tf32=False)
    eager = train(make_config(hamlet_data, compile="off", **settings), tmp_path / "eager")[1]
    trainer, compiled = train(make_config(hamlet_data, compile="on", **settings), tmp_path / "compiled")
    assert trainer.compiled, "compilation failed and the run fell back to eager"
    assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_losses_follow_fp32(device, precision, hamlet_data, tmp_path):
    """bf16, and fp16 with its gradient scaler, train like fp32 (within their rounding)."""
    settings = dict(device=device, compile="off", max_steps=16, max_lr=6e-3)
    reference = train(make_config(hamlet_data, precision="fp32", **settings), tmp_path / "fp32")[1]
    config = make_config(hamlet_data, precision=precision, **settings)
    trainer, low = train(config, tmp_path / precision)
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert 0 < trainer.scaler.get_scale() < float("inf")
    assert_close(low, reference, rtol=3e-2, atol=0)
    assert low[-1] < low[0] - 0.3  # and it learns


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e3, None])
def test_clip_gradients_is_clip_grad_norm(max_norm):
    """The same gradients bit for bit and the same norm as clip_grad_norm_, clipping or not."""
    from gpt2scratch.trainer import clip_gradients

    x = torch.randint(0, 1000, (2, 32))
    results = []
    for clip in ("ours", "torch"):
        torch.manual_seed(0)
        model = GPT(model_config())
        model(x, x)[1].backward()
        parameters = list(model.parameters())
        if clip == "ours":
            norm = clip_gradients(parameters, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf")).item()
        results.append((norm, [p.grad.clone() for p in parameters]))
    (ours_norm, ours), (torch_norm, reference) = results
    assert ours_norm == torch_norm and 1e-3 < ours_norm < 1e3  # (so both regimes are tested)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


@pytest.mark.parametrize("fused", [False, True])
def test_fused_and_foreach_adamw_agree(fused, hamlet_data, tmp_path):
    base = train(make_config(hamlet_data, fused_adamw=True), tmp_path / "fused")[1]
    other = train(make_config(hamlet_data, fused_adamw=fused), tmp_path / "other")[1]
    assert_close(other, base, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# MFU, early stop, presets.


def test_mfu_uses_the_given_peak(hamlet_data, tmp_path):
    _, _ = train(make_config(hamlet_data, peak_tflops=0.001), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert steps and all(r["mfu"] > 0 for r in steps)
    assert all(r["mfu"] == pytest.approx(r["tokens_per_sec"] * _flops(tmp_path) / 1e9) for r in steps)


def _flops(run_dir) -> float:
    from gpt2scratch.estimates import flops_per_token

    config = Config.from_dict(json.loads((run_dir / "run_config.json").read_text()))
    return flops_per_token(config.model)


def test_peak_flops_table_matches_gpu_names():
    from gpt2scratch.runtime import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080") is None
    runtime = Runtime(torch.device("cpu"), "fp32", compile=False, peak_flops_per_device=5e12, world_size=2)
    assert runtime.peak_flops() == 10e12


class ScriptedTrainer(Trainer):
    """Val losses from a script instead of the model: when they stop improving is then known."""

    script = [5.0, 4.0, 4.1, 3.9, 4.0, 4.2, 4.3, 4.4, 4.5]

    def evaluate(self) -> dict:
        loss = self.script[len(self.history)]
        return {"step": self.step, "val_loss": loss, "val_ppl": 2.718**loss, "val_bpb": loss / 2}


def test_early_stop_ends_the_run_when_val_loss_stops_improving(hamlet_data, tmp_path):
    config = make_config(hamlet_data, max_steps=40, eval_every=2, save_every=0, early_stop=3)
    runtime = setup_runtime(config.training)
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    trainer = ScriptedTrainer(config, tmp_path, runtime, data)
    summary = trainer.fit()
    # best 3.9 at the 4th evaluation (step 8); 4.0, 4.2, 4.3 do not improve: stop at the 7th (step 14)
    assert summary["step"] == 14 and trainer.best_step == 8 and summary["stopped_early"]
    assert checkpoint.latest(tmp_path / "ckpt").name == "step_000014"  # the last step is saved, as at max_steps
    assert trainer.run_config().training.max_steps == 14
    # each new best was saved as it came (save_every 0 saves only the last step otherwise), and kept
    assert trainer.best_checkpoint() == tmp_path / "ckpt" / "step_000008"


def test_an_early_stopped_run_exports_its_best_weights(hamlet_data, tmp_path, monkeypatch, capsys):
    """`train --early-stop N` writes hf/ from the best evaluation's weights, not from the steps after it."""
    from safetensors.torch import load_file

    from gpt2scratch.cli import main

    monkeypatch.setattr(Trainer, "evaluate", ScriptedTrainer.evaluate)
    monkeypatch.setattr(Trainer, "script", ScriptedTrainer.script, raising=False)
    args = ["--preset", "tiny", "--data-dir", hamlet_data, "--out", tmp_path, "--max-steps", "40", "--eval-every", "2"]
    assert main(["train", *map(str, args), "--save-every", "0", "--early-stop", "3", "--sample-every", "0"]) == 0
    assert "the best weights (step 8)" in capsys.readouterr().out
    exported = load_file(tmp_path / "hf" / "model.safetensors")["transformer.wpe.weight"]
    best, last = (checkpoint.load_model_state(tmp_path / "ckpt" / f"step_{s:06d}") for s in (8, 14))
    assert torch.equal(exported, best["transformer.wpe.weight"])
    assert not torch.equal(exported, last["transformer.wpe.weight"])


def test_early_stop_in_the_wsd_plateau_starts_the_decay(hamlet_data, tmp_path):
    """On a wsd schedule a val loss that stops improving before the decay begins the decay there (the run shortened
    so that its decay_fraction starts now), instead of stopping at the high learning rate."""
    config = make_config(hamlet_data, max_steps=40, eval_every=2, save_every=0, early_stop=3, schedule="wsd")
    runtime = setup_runtime(config.training)
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    trainer = ScriptedTrainer(config, tmp_path, runtime, data)
    summary = trainer.fit()
    # best 3.9 at step 8; 4.0, 4.2, 4.3 at steps 10-14, in the plateau (decay from step 32 of 40): the decay
    # starts at 14, 20% of round(14 / 0.8) = 18 steps; 4.4 at 16 is one evaluation without improvement, not 3
    assert summary["step"] == 18 and not summary["stopped_early"] and trainer.cooldown_step == 14
    assert trainer.run_config().training.max_steps == 18
    lrs = read_metrics(tmp_path, "lr")  # step n's record holds the learning rate of its update, lr_at(n - 1)
    max_lr = config.training.max_lr
    assert lrs[14] == lrs[15] == pytest.approx(max_lr) and lrs[16] == pytest.approx(max_lr * 3 / 4)
    assert lrs[18] == pytest.approx(max_lr / 4) and lr_at(18, trainer.schedule) == 0.0


def test_early_stop_in_the_wsd_decay_stops_and_a_resume_keeps_the_count(hamlet_data, tmp_path, monkeypatch):
    """After the decay began, early_stop evaluations without improvement end the run (exporting the best
    weights); a run resumed from the checkpoint where the decay began counts as the whole run does."""
    from gpt2scratch.cli import main

    monkeypatch.setattr(Trainer, "evaluate", ScriptedTrainer.evaluate)
    monkeypatch.setattr(Trainer, "script", ScriptedTrainer.script, raising=False)
    args = ["--preset", "tiny", "--data-dir", hamlet_data, "--max-steps", "40", "--eval-every", "2"]
    args += ["--schedule", "wsd", "--decay-fraction", "0.5", "--early-stop", "2", "--save-every", "2"]
    args += ["--keep-last", "20", "--sample-every", "0"]
    assert main(["train", *map(str, args), "--out", str(tmp_path / "full")]) == 0
    # best at step 8; 4.0, 4.2 at 10, 12 (plateau): decay from 12 to round(12 / 0.5) = 24; 4.3, 4.4 at 14, 16
    full = json.loads((tmp_path / "full" / "ckpt" / "step_000016" / "state.json").read_text())
    assert full["config"]["training"]["max_steps"] == 16 and full["cooldown_step"] == 12
    assert checkpoint.latest(tmp_path / "full" / "ckpt").name == "step_000016"
    resumed_at = json.loads((tmp_path / "full" / "ckpt" / "step_000012" / "state.json").read_text())
    assert resumed_at["config"]["training"]["max_steps"] == 24
    copy_checkpoint(tmp_path / "full", tmp_path / "half", 12)
    assert main(["train", *map(str, args), "--out", str(tmp_path / "half"), "--resume"]) == 0
    assert checkpoint.latest(tmp_path / "half" / "ckpt").name == "step_000016"
    after = {step: lr for step, lr in read_metrics(tmp_path / "full", "lr").items() if step > 12}
    assert read_metrics(tmp_path / "half", "lr") == after


def test_presets_for_the_seed_and_the_gpu():
    assert resolve_config("seed") == resolve_config(None)  # the seed's GPTConfig and TrainingConfig
    gpu = resolve_config("gpu")
    assert (gpu.model.n_layers, gpu.model.emb_dim, gpu.model.context_length) == (6, 384, 256)
    assert gpu.training.early_stop > 0 and gpu.training.time_budget > 0 and gpu.data.tokenizer == "bpe:4096"
    assert (gpu.training.optimizer, gpu.training.schedule, gpu.training.max_steps) == ("muon", "wsd", 1000)
    assert not gpu.training.budget_extends  # sized to the data: the budget only shortens it


def test_time_budget_fills_or_only_shortens(hamlet_data, tmp_path):
    """budget_extends on: max_steps grows to fill the minutes; off: the configured max_steps is the most it gets,
    at calibration and at the refit, while a budget too short for it still shortens the run."""
    import time

    from gpt2scratch.budget import TimeBudget

    fitted = {}
    for extends in (True, False):
        config = make_config(hamlet_data, max_steps=8, budget_extends=extends)
        runtime = setup_runtime(config.training)
        data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
        budget = TimeBudget.calibrate(Trainer(config, tmp_path / str(extends), runtime, data), 1.0)
        budget.step_seconds = [0.01] * 10
        fitted[extends] = budget.max_steps, budget.refit(5)
    assert fitted[False] == (8, 8)
    assert min(fitted[True]) > 100  # a tiny model's steps take milliseconds: a minute holds thousands
    short = TimeBudget(time.perf_counter() + 0.05, 0.0, 0, 8, 2, torch.device("cpu"), limit=8)
    short.step_seconds = [0.01] * 10
    assert short.refit(1) < 8


def test_time_budget_refits_later_from_the_recent_pace():
    """After REFIT_STEP the budget refits (wsd, at the peak learning rate) every REFIT_EVERY steps from the last
    REFIT_EVERY steps' pace and the evaluations' measured times, and never starts the decay before the step."""
    import time

    from gpt2scratch.budget import REFIT_EVERY, REFIT_STEP, TimeBudget

    budget = TimeBudget(time.perf_counter() + 100.0, 0.0, 0, 1000, 10, torch.device("cpu"))
    assert budget.refit_due(REFIT_STEP) and budget.refit_due(REFIT_STEP, at_peak_lr=True)
    assert not budget.refit_due(REFIT_STEP + REFIT_EVERY) and budget.refit_due(REFIT_STEP + REFIT_EVERY, True)
    assert not budget.refit_due(REFIT_STEP + REFIT_EVERY // 2, True) and not budget.refit_due(REFIT_EVERY // 2, True)
    budget.step_seconds = [1.0] * 150 + [0.1] * REFIT_EVERY  # a slow start: the run's median is still 1 s
    assert 1150 < budget.refit(250) <= 1250  # ~1,000 steps of 0.1 s in the 100 s left
    budget.step_seconds += [10.0] * REFIT_EVERY  # slower now: 10 steps fit, but the decay may not start before 350
    assert budget.refit(350, at_least=438) == 438

    timed = TimeBudget(time.perf_counter() + 100.0, 0.0, 100, 1000, 10, torch.device("cpu"))
    timed.step_seconds = [0.1] * 200
    for seconds in (2.0, 9.0, 2.0, 3.0):  # the median of the last three evaluations
        timed.record_eval(seconds)
    assert timed.eval_seconds == 3.0
    assert 200 + 600 < timed.refit(200) < 200 + 750  # 100 s less ~10 evaluations of 3 s (not 2), in steps of 0.1 s


def test_time_budget_holds_when_the_machine_slows_down(hamlet_data, tmp_path):
    """A run whose steps become 30 ms slower after its first refit (~3.5x here) still ends near its budget (the
    later refits shorten it), and the wsd learning rate holds its peak, then falls steadily: no refit makes it
    jump."""
    import time

    from gpt2scratch.budget import TimeBudget

    config = make_config(hamlet_data, schedule="wsd", warmup_steps=10, max_steps=100, eval_every=50, log_every=10**6)
    runtime = setup_runtime(config.training)
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    trainer = Trainer(config, tmp_path, runtime, data)
    minutes = 0.15
    started = time.perf_counter()
    budget = TimeBudget.calibrate(trainer, minutes)
    forward = trainer._forward

    def slower_after_the_first_refit(x, y):
        if trainer.step >= 100:
            time.sleep(0.03)
        return forward(x, y)

    trainer._forward = slower_after_the_first_refit
    summary = trainer.fit(budget)
    elapsed = time.perf_counter() - started
    assert budget.max_steps == summary["step"] > 110, budget.max_steps
    assert json.loads((tmp_path / "run_config.json").read_text())["training"]["max_steps"] == summary["step"]
    assert elapsed < minutes * 60 + 2.0, elapsed  # (refitting only at step 100: 28 s, 19 over, 2026-12-07)
    lrs = [lr for step, lr in sorted(read_metrics(tmp_path, "lr").items())][10:]
    peak = config.training.max_lr
    decay = next(i for i, lr in enumerate(lrs) if lr < peak)
    assert all(lr == pytest.approx(peak) for lr in lrs[:decay])
    falls = [lrs[i - 1] - lrs[i] for i in range(decay, len(lrs))]
    assert all(f == pytest.approx(falls[0], rel=1e-6) for f in falls), falls  # one straight line down to 0


def test_auto_preset_is_gpu_on_cuda(monkeypatch):
    from gpt2scratch import run
    from gpt2scratch.options import TrainOptions

    monkeypatch.setattr(run, "pick_device", lambda requested: (torch.device("cuda", 0), "test"))
    assert run._preset("auto", TrainOptions(), {}) == "gpu"
    monkeypatch.setattr(run, "pick_device", lambda requested: (torch.device("cpu"), "test"))
    assert run._preset("auto", TrainOptions(), {}) == "cpu"


@pytest.mark.parametrize("emulated", [True, False])
def test_bf16_asked_for_on_a_cpu_that_emulates_it_is_warned_about(emulated, monkeypatch, caplog, capsys):
    """Training with --precision bf16, or decoding with --dtype bf16, on an x86 CPU without bf16 instructions
    (several times slower than fp32 there) says so and names the faster choice; on other CPUs nothing is said."""
    from gpt2scratch import cli, runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: not emulated)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert runtime.cpu_bf16_is_emulated() == emulated
    with caplog.at_level("WARNING", logger="gpt2scratch.runtime"):
        setup_runtime(TrainingConfig(device="cpu", precision="bf16"))
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == int(emulated)
    assert all("bf16 on this CPU" in w and "5x slower than fp32" in w and "--precision auto" in w for w in warned)
    assert cli._dtype("bf16", torch.device("cpu")) == "bf16"  # still what was asked for
    printed = capsys.readouterr().err
    assert ("emulated" in printed and "--dtype fp32 or int8" in printed) == emulated
    monkeypatch.setattr(runtime.platform, "machine", lambda: "arm64")  # no x86 flags to read: nothing assumed
    assert not runtime.cpu_bf16_is_emulated()


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_dynamic_is_named_and_warned_about_by_the_cpus_int8_instructions(vnni, monkeypatch, capsys):
    """Without VNNI or AMX int8 instructions (an AVX2-only CPU) int8-dynamic is no faster than fp32: `auto`'s hint
    names it only where they are, and asking for it where they are not says so."""
    from gpt2scratch import cli, quantization, runtime

    flags = "flags : fpu sse2 avx2 fma" + (" avx512f avx512_vnni" if vnni else "")
    monkeypatch.setattr(runtime, "_cpuinfo", lambda: flags)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert runtime.cpu_int8_is_emulated() != vnni and runtime.cpu_bf16_is_emulated()
    dtype, reason = quantization.pick_dtype("auto", torch.device("cpu"))
    assert dtype == "fp32" and "--dtype int8 " in reason and ("int8-dynamic" in reason) == vnni
    # without VNNI, eager int8 is no faster than fp32 in batches; compiled, it is (README)
    assert ("--dtype int8 --compile decodes faster here, one prompt or a batch" in reason) != vnni
    assert cli._dtype("int8-dynamic", torch.device("cpu")) == "int8-dynamic"  # still what was asked for
    printed = capsys.readouterr().err
    assert ("no int8 dot-product instructions" in printed and "--dtype int8 is faster" in printed) != vnni


# ----------------------------------------------------------------------------------------------------------------------
# On a GPU only.


@pytest.mark.cuda
def test_cuda_resume_is_bit_for_bit(hamlet_data, tmp_path):
    """bf16 autocast and dropout on the GPU: N steps == N/2 + resume + N/2, exactly (CUDA RNG restored)."""
    config = make_config(
        hamlet_data, drop_rate=0.1, device="cuda", precision="bf16", compile="off", max_steps=12, save_every=6
    )
    train(config, tmp_path / "full")
    copy_checkpoint(tmp_path / "full", tmp_path / "half", 6)
    train(config, tmp_path / "half", resume=True)
    full, half = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert [half[s] for s in range(7, 13)] == [full[s] for s in range(7, 13)]
    assert same_weights(tmp_path / "full", tmp_path / "half", 12)


@pytest.mark.cuda
def test_cuda_deferred_reads_take_the_same_steps(hamlet_data, tmp_path):
    """On the GPU a step's loss and norm are read after the next step is queued (Trainer.defer_reads, the
    default there; the skip of a non-finite step a device flag): the same losses and weights, bit for bit, as
    reading each step at once."""
    config = make_config(
        hamlet_data, drop_rate=0.1, device="cuda", precision="bf16", compile="off", max_steps=10, grad_clip=0.5
    )
    deferred, deferred_losses = train(config, tmp_path / "deferred")
    assert deferred.defer_reads
    runtime = setup_runtime(config.training)
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    at_once = Trainer(config, tmp_path / "at_once", runtime, data)
    at_once.defer_reads = False
    at_once.fit()
    assert losses(tmp_path / "at_once") == losses(tmp_path / "deferred") and len(deferred_losses) == 10
    assert same_weights(tmp_path / "at_once", tmp_path / "deferred", 10)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kv_cache_generation_equals_recomputation(dtype):
    torch.manual_seed(0)
    model = GPT(model_config(context_length=64)).to("cuda", dtype).eval()
    prompt = [[5, 17, 3, 99, 42, 8, 1]]
    cached = generate_ids(model, prompt, 30, temperature=0)[0]
    history = list(prompt[0])
    with torch.no_grad():
        for token in cached:
            logits = model(torch.tensor([history], device="cuda"))[0][0, -1].float()
            # the cached choice is the recomputed argmax, or within bf16 rounding of it
            assert logits[token] >= logits.max() - (0 if dtype == torch.float32 else 0.1)
            history.append(token)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_decoding_follows_the_model(dtype):
    """Decoding replayed from CUDA graphs (generation.use_cuda_graphs): each greedy token is the argmax of the
    model's own logits for the text so far (within rounding), in a padded batch and alone; past the context
    (crops: a new capture each) it goes on."""
    from gpt2scratch.generation import use_cuda_graphs
    from gpt2scratch.quantization import apply_dtype

    torch.manual_seed(0)
    config = model_config(context_length=32)
    state = GPT(config).state_dict()
    models = []
    for _ in range(2):  # the same weights, converted the same way
        models.append(GPT(config))
        models[-1].load_state_dict(state)
        apply_dtype(models[-1].to("cuda").eval(), dtype)
    model, graphed = models[0], use_cuda_graphs(models[1])
    prompts = [[5, 17, 3, 99, 42, 8, 1], [64, 2]]
    for batch in (prompts, prompts[:1]):
        tokens = generate_ids(graphed, batch, 24, temperature=0)  # 7 + 24 < 32: no crop
        for prompt, row in zip(batch, tokens, strict=True):
            history = list(prompt)
            with torch.no_grad():
                for token in row:
                    logits = model(torch.tensor([history], device="cuda"))[0][0, -1].float()
                    assert logits[token] >= logits.max() - (1e-4 if dtype == "fp32" else 0.1)
                    history.append(token)
    captures = graphed.compiled_decoding.captures
    assert captures == 2  # one per generation
    long = generate_ids(graphed, prompts, 60, temperature=0)
    assert [len(row) for row in long] == [60, 60] and graphed.compiled_decoding.captures >= captures + 3


@pytest.fixture(scope="module")
def cuda_trained_model(hamlet_data, tmp_path_factory):
    """A tiny model trained on the GPU by the command a user runs, exported."""
    out = tmp_path_factory.mktemp("cuda_run")
    args = ["--preset", "tiny", "--max-steps", "30", "--data-dir", str(hamlet_data), "--out", str(out)]
    result = run_cli("train", *args, "--device", "cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mfu" in (out / "metrics.jsonl").read_text()
    return out


@pytest.mark.cuda
def test_cuda_generate_serve_and_eval_commands(cuda_trained_model, tmp_path):
    hf = cuda_trained_model / "hf"
    generated = run_cli("generate", str(hf), "--prompt", "To be", "--max-new-tokens", "20")  # on the GPU by default
    assert generated.returncode == 0 and generated.stdout.startswith("To be"), generated.stderr[-2000:]
    assert "device: cuda:0 (CUDA is available" in generated.stderr
    # (its tokens' agreement with the model's own steps: test_cuda_graph_decoding_follows_the_model)
    flags = ["--prompt", "To be", "--max-new-tokens", "20", "--device", "cuda", "--cuda-graphs", "--num-samples", "2"]
    graphed = run_cli("generate", str(hf), *flags)
    assert graphed.returncode == 0 and graphed.stdout.count("To be") == 2, graphed.stderr[-2000:]
    hellaswag = tmp_path / "hellaswag.jsonl"
    example = {"ctx": "To be, or not to be,", "label": 0, "endings": ["that is the question", "a b c", "x", "y"]}
    hellaswag.write_text("\n".join(json.dumps(example) for _ in range(4)) + "\n")
    scored = run_cli("eval", str(hf), "--task", "hellaswag", "--data", str(hellaswag), "--json", "--device", "cuda")
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout)["examples"] == 4
    with ServerProcess(hf, "--device", "cuda") as server:
        body = json.dumps({"prompt": "To be", "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(
            server.url + "/v1/completions", body, {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["text"]


# ----------------------------------------------------------------------------------------------------------------------
# Dropout on CPUs (models/dropout.py): PyTorch's distribution, cheaper.


def test_cpu_dropout_keeps_one_minus_p_and_is_unbiased():
    from gpt2scratch.models.dropout import Dropout, keep_mask

    keep, scale = keep_mask((4, 1000, 1000), 0.1, torch.device("cpu"))
    assert abs(keep.float().mean().item() - 0.9) < 1e-3 and scale == pytest.approx(1 / (1 - 6554 / 65536))
    lanes = keep.view(-1, 4).float().mean(0)  # each 16-bit lane of a 64-bit draw keeps as often
    assert torch.all((lanes - 0.9).abs() < 2e-3)
    layer = Dropout(0.1).train()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.full((4_000_000,), 3.0, dtype=dtype)
        y = layer(x)
        assert set(y.unique().tolist()) == {0.0, (x[0] * scale).item()}
        assert y.float().mean().item() == pytest.approx(3.0, rel=2e-3)
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("T", [600, 1024])
def test_cpu_causal_attention_with_dropout_is_attention(T):
    """At p 0 it is causal attention (values and gradients); at p 0.1 its average over draws is too."""
    import torch.nn.functional as F

    from gpt2scratch.models.dropout import causal_attention_with_dropout

    q, k, v = (torch.randn(2, 3, T, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours, reference = (
        causal_attention_with_dropout(q, k, v, 0.0),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )
    assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    ours_grads = torch.autograd.grad(ours.sum(), (q, k, v))
    for a, b in zip(ours_grads, torch.autograd.grad(reference.sum(), (q, k, v)), strict=True):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        mean = torch.stack([causal_attention_with_dropout(q, k, v, 0.1) for _ in range(200)]).mean(0)
        assert ((mean - reference).norm() / reference.norm()).item() < 0.05  # sampling noise ~0.024
        dropped = causal_attention_with_dropout(q, k, v, 0.1)
        assert not torch.allclose(dropped, reference)


@pytest.mark.parametrize("T", [600, 1024])
def test_cpu_attention_dropout_backward_is_autograds(T):
    """With dropout on: the written-out backward gives autograd's gradients of the same computation, same masks."""
    import math

    from gpt2scratch.models.dropout import causal_attention_with_dropout, keep_mask

    def autograd_version(q, k, v, p, block=256):  # the same blocks, drawing the same masks in the same order
        att_all = []
        for start in range(0, T, block):
            end = min(T, start + block)
            att = q[:, :, start:end] @ k[:, :, :end].transpose(-2, -1) / math.sqrt(q.size(-1))
            att = att.masked_fill(torch.ones(end - start, end, dtype=torch.bool).triu(start + 1), float("-inf"))
            att = torch.softmax(att, dim=-1)
            keep, scale = keep_mask(att.shape, p, att.device)
            att_all.append((att * keep * scale) @ v[:, :, :end])
        return torch.cat(att_all, dim=2)

    q, k, v = (torch.randn(2, 3, T, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, T, 16, dtype=torch.float64)
    results = []
    for attention in (causal_attention_with_dropout, autograd_version):
        torch.manual_seed(7)
        out = attention(q, k, v, 0.1)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for ours, reference in zip(*results, strict=True):
        assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    with torch.autocast("cpu", torch.bfloat16):  # bf16 matmuls, fp32 softmax: the same to bf16 rounding
        torch.manual_seed(7)
        out = causal_attention_with_dropout(*(t.bfloat16() for t in (q, k, v)), 0.1)
    assert out.dtype == torch.bfloat16
    assert_close(out.double(), results[1][0], rtol=0.05, atol=0.05)


def test_cpu_training_with_dropout_takes_the_cheap_path(monkeypatch):
    from gpt2scratch.models import dropout

    calls = []
    original = dropout.causal_attention_with_dropout
    monkeypatch.setattr(
        "gpt2scratch.models.multi_head_self_attention.causal_attention_with_dropout",
        lambda *a, **kw: calls.append(1) or original(*a, **kw),
    )
    model = GPT(model_config(drop_rate=0.1)).train()
    x = torch.randint(0, 1000, (2, 32))
    model(x, x)[1].backward()
    assert len(calls) == 2  # one per layer
    model.eval()(x)
    assert len(calls) == 2  # not in eval mode


FAULTS = """
import resource, sys, torch
from gpt2scratch.runtime import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # 64 MiB blocks, as a step's logits: the first ones are faulted in either way
    torch.ones(16 << 20)
before = faults()
for _ in range(10):
    torch.ones(16 << 20)
print(kept, faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    """A freed 64 MiB block comes back without faulting its 16,384 pages in again (the opt-out shows the cost)."""
    runs = {}
    for setting in ("1", "0"):
        env = {**os.environ, "GPT2SCRATCH_KEEP_FREED_MEMORY": setting}
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
        runs[setting] = out.stdout.split()
    assert runs["1"][0] == "True" and runs["0"][0] == "False"
    assert int(runs["0"][1]) > 10 * 16384 * 0.9  # each block faulted in again: what the setting saves
    assert int(runs["1"][1]) < 1000
