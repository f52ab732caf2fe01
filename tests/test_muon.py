"""`--optimizer muon` (Muon for the blocks' matrices, AdamW for the rest) and `--schedule wsd`: the split, the
schedule's shape, exact resume and two torchrun ranks equal to one, as for AdamW."""

import math

import pytest
import torch

from gpt2scratch.config import Config, GPTConfig, TrainingConfig, resolve_config
from gpt2scratch.dataset.data_module import DataModule
from gpt2scratch.models import GPT
from gpt2scratch.runtime import Runtime
from gpt2scratch.testing import copy_checkpoint, run_cli, same_weights, torchrun, train_one_and_two
from gpt2scratch.testing import read_metrics as metrics
from gpt2scratch.trainer import Trainer, configure_optimizers, lr_at


def make_config(data_dir, **training) -> Config:
    config = resolve_config("tiny", overrides={"data": {"dir": str(data_dir)}})
    model = GPTConfig(**{**config.model.__dict__, "vocab_size": 512, "drop_rate": 0.1})
    values = dict(tokens_per_step=0, batch_size=4, warmup_steps=2, max_steps=20, eval_every=10, sample_every=0)
    values.update(optimizer="muon", schedule="wsd", **training)
    return Config(model, TrainingConfig(**values), config.data)


def fit(config: Config, run_dir, resume=False) -> Trainer:
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    trainer = Trainer(config, run_dir, Runtime(torch.device("cpu"), "fp32", compile=False), data, resume=resume)
    trainer.fit()
    return trainer


def test_wsd_schedule_warms_up_holds_then_decays_to_zero():
    t = TrainingConfig(max_steps=1000, warmup_steps=100, max_lr=1e-3, schedule="wsd", decay_fraction=0.2)
    assert lr_at(0, t) == pytest.approx(1e-5) and lr_at(99, t) == pytest.approx(1e-3)
    assert lr_at(100, t) == lr_at(500, t) == lr_at(800, t) == pytest.approx(1e-3)  # stable until the last 20%
    assert lr_at(900, t) == pytest.approx(0.5e-3) and lr_at(1000, t) == 0.0
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(100, 1000))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True))
    training = TrainingConfig(optimizer="muon", muon_lr=0.02, max_lr=1e-3)
    muon, adamw = configure_optimizers(model, training, torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")}
    assert len(in_muon) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_adamw == set(names.values()) - in_muon  # embeddings, head, biases, LayerNorm gains
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)


def muon_reference(params, grads_per_step, lr, weight_decay, momentum=0.95):
    """Muon as torch.optim.Muon defines it (Nesterov momentum, the quintic Newton-Schulz iteration of the
    wide-way-round matrix scaled to norm 1, lr x 0.2 sqrt(max(A, B)), decoupled weight decay), in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for param, buf, grad in zip(params, bufs, grads, strict=True):
            grad = grad.double()
            buf.lerp_(grad, 1 - momentum)
            x = grad.lerp(buf, momentum)
            x = x.T if x.size(0) > x.size(1) else x
            x = x / x.norm().clamp(min=1e-7)
            for _ in range(5):
                gram = x @ x.T
                x = a * x + (b * gram + c * gram @ gram) @ x
            x = x.T if param.size(0) > param.size(1) else x
            param.mul_(1 - lr * weight_decay).add_(x, alpha=-lr * 0.2 * math.sqrt(max(param.shape)))
    return params


@pytest.mark.parametrize("fp32", [False, True])
def test_muon_is_pytorchs_or_its_fp32_twin(fp32):
    """fp32=False: torch.optim.Muon's steps bit for bit; fp32=True (CPUs that emulate bf16): the same algorithm
    with the Newton-Schulz iteration in fp32, equal to a float64 Muon to fp32 rounding, where PyTorch's bf16
    iteration is only within ~1% of it."""
    from gpt2scratch.trainer import Muon

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 64), (32, 32)]
    start = [torch.randn(s) for s in shapes]
    grads_per_step = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = {}
    for name, make in (("torch", torch.optim.Muon), ("ours", lambda ps, **kw: Muon(ps, fp32=fp32, **kw))):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for grads in grads_per_step:
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        results[name] = [p.detach() for p in params]
        assert set(optimizer.state_dict()["state"][0]) == {"momentum_buffer"}  # checkpoints alike
    reference = muon_reference(start, grads_per_step, lr=0.02, weight_decay=0.1)
    for torchs, ours, exact, first in zip(results["torch"], results["ours"], reference, start, strict=True):
        moved = (exact - first.double()).norm()
        if fp32:
            assert (ours.double() - exact).norm() < 1e-6 * exact.norm()  # the fp32 parameters' own rounding
            assert (torchs.double() - exact).norm() > 1e-3 * moved  # bf16's iteration: visibly rounder
        else:
            assert torch.equal(ours, torchs)
        assert (torchs.double() - exact).norm() < 0.05 * moved


def test_muon_iterates_in_fp32_where_the_cpu_emulates_bf16(monkeypatch):
    from gpt2scratch import trainer

    model = GPT(GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=2, n_layers=1))
    training = TrainingConfig(optimizer="muon")
    for emulated in (True, False):
        monkeypatch.setattr(trainer, "cpu_bf16_is_emulated", lambda emulated=emulated: emulated)
        muon, _ = configure_optimizers(model, training, torch.device("cpu"))
        assert muon.fp32 == emulated
    monkeypatch.setattr(trainer, "cpu_bf16_is_emulated", lambda: True)
    muon, _ = configure_optimizers(model, training, torch.device("meta"))  # not a CPU: PyTorch's own iteration
    assert not muon.fp32


def test_muon_learns_and_resumes_bit_for_bit(hamlet_data, tmp_path):
    """N steps == N/2 + resume + N/2 with Muon + WSD and dropout: both optimizers' states are checkpointed."""
    config = make_config(hamlet_data, save_every=10, keep_last=5)
    fit(config, tmp_path / "full")
    copy_checkpoint(tmp_path / "full", tmp_path / "half", 10)
    fit(config, tmp_path / "half", resume=True)
    full, half = metrics(tmp_path / "full"), metrics(tmp_path / "half")
    assert [half[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]
    assert same_weights(tmp_path / "full", tmp_path / "half", 20)
    assert full[20] < full[1] - 0.3  # and it learns


def test_muon_with_fsdp_is_refused(hamlet_data, tmp_path):
    result = run_cli("train", "--preset", "tiny", "--data-dir", str(hamlet_data), "--optimizer", "muon", "--fsdp",
                     "--out", str(tmp_path))  # fmt: skip
    assert result.returncode != 0
    assert "FSDP" in result.stderr or "torchrun" in result.stderr  # (one process: --fsdp itself asks for torchrun)


@pytest.mark.distributed
def test_muon_torchrun_two_processes_equal_one(hamlet_data, tmp_path):
    args = ["--preset", "tiny", "--max-steps", "8", "--eval-every", "4", "--batch-size", "2", "--optimizer", "muon"]
    args += ["--tokens-per-step", "512", "--warmup-steps", "2", "--data-dir", str(hamlet_data), "--precision", "fp32"]
    a, b = train_one_and_two(args, tmp_path)
    assert a.keys() == b.keys() == set(range(1, 9))
    # Muon orthogonalises in bf16 (in fp32 on CPUs that emulate bf16): the all-reduce's other summation order shows
    # at ~2e-5 (AdamW: 1e-5)
    assert all(math.isclose(a[s], b[s], abs_tol=1e-4) for s in a), (a, b)
    fsdp = torchrun("train", *args, "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert fsdp.returncode != 0 and "--optimizer muon needs each weight matrix whole" in fsdp.stderr
