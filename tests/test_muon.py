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
    # PyTorch's Muon orthogonalises in bf16: the all-reduce's other summation order shows at ~2e-5 (AdamW: 1e-5)
    assert all(math.isclose(a[s], b[s], abs_tol=1e-4) for s in a), (a, b)
    fsdp = torchrun("train", *args, "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert fsdp.returncode != 0 and "--optimizer muon needs each weight matrix whole" in fsdp.stderr
