"""Training: the seed's schedule, learning at all, exact resume, crash safety of checkpoints, and torchrun."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gpt2scratch import checkpoint
from gpt2scratch.config import GPTConfig, TrainingConfig, resolve_config
from gpt2scratch.dataset.data_module import DataModule
from gpt2scratch.models import GPT
from gpt2scratch.runtime import Runtime
from gpt2scratch.testing import COMMAND, run_cli, same_weights, torchrun, train_one_and_two
from gpt2scratch.trainer import Trainer, TrainingError, configure_optimizer, lr_at

TRAIN_ARGS = ["--preset", "tiny", "--tokens-per-step", "0", "--batch-size", "4", "--warmup-steps", "5"]


@pytest.fixture(scope="module")
def data_dir(hamlet_data):
    return hamlet_data


def cpu_runtime() -> Runtime:
    return Runtime(torch.device("cpu"), "fp32", compile=False)


def make_config(data_dir, **training):
    config = resolve_config("tiny", overrides={"model": {"vocab_size": 512}, "data": {"dir": str(data_dir)}})
    values = dict(tokens_per_step=0, batch_size=4, warmup_steps=2, max_steps=20, eval_every=0, sample_every=0)
    values.update(training)
    return type(config)(config.model, TrainingConfig(**values), config.data)


def make_trainer(config, run_dir, resume=False) -> Trainer:
    data = DataModule(config.data.dir, config.model.context_length, config.training.batch_size)
    return Trainer(config, run_dir, cpu_runtime(), data, resume=resume)


def metrics(run_dir, key="train_loss") -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


# ----------------------------------------------------------------------------------------------------------------------


def test_lr_schedule_matches_the_seed():
    """Linear warm-up to 6e-4 over 715 steps, cosine to 6e-5 at 19073 (build-nanogpt's numbers)."""
    t = TrainingConfig()
    assert lr_at(0, t) == pytest.approx(6e-4 / 715)
    assert lr_at(714, t) == pytest.approx(6e-4)
    assert lr_at(715, t) == pytest.approx(6e-4)
    assert lr_at(715 + (19073 - 715) // 2, t) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-4)
    assert lr_at(19073, t) == pytest.approx(6e-5)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(715, 19073, 97))  # monotone decay


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=2, qkv_bias=True))
    optimizer = configure_optimizer(model, TrainingConfig(), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_few_steps_lower_the_loss(data_dir, tmp_path):
    trainer = make_trainer(make_config(data_dir, max_steps=30, max_lr=3e-3), tmp_path)
    before = trainer.evaluate()["val_loss"]
    trainer.fit()
    losses = metrics(tmp_path)
    assert trainer.evaluate()["val_loss"] < before - 0.3
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 0.3


def test_one_batch_can_be_overfitted():
    """A model that cannot memorise one batch has a bug in its forward, loss or optimizer wiring."""
    config = GPTConfig(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    model = GPT(config)
    optimizer = configure_optimizer(model, TrainingConfig(weight_decay=0.0, max_lr=1e-2), torch.device("cpu"))
    batch = torch.randint(0, 128, (4, 33))
    for _ in range(200):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_resume_is_bit_for_bit(data_dir, tmp_path):
    """N steps == N/2 + resume + N/2, with dropout on: weights, optimizer, data order and RNG all restored."""
    config = make_config(data_dir, max_steps=20, save_every=10, keep_last=5, eval_every=10)
    config = type(config)(GPTConfig(**{**config.model.__dict__, "drop_rate": 0.1}), config.training, config.data)
    make_trainer(config, tmp_path / "full").fit()
    (tmp_path / "half" / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "ckpt" / "step_000010", tmp_path / "half" / "ckpt" / "step_000010")
    make_trainer(config, tmp_path / "half", resume=True).fit()
    full, half = metrics(tmp_path / "full"), metrics(tmp_path / "half")
    assert [half[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]  # exact float equality
    assert metrics(tmp_path / "half", "val_loss")[20] == metrics(tmp_path / "full", "val_loss")[20]
    assert same_weights(tmp_path / "full", tmp_path / "half", 20)


def test_deferred_reads_take_the_same_steps(data_dir, tmp_path):
    """How a GPU trains (defer_reads: a step's loss and gradient norm read after the next step is queued, clipping
    and the skip of a non-finite step done on the device) gives the same records, checkpoints and weights, bit for
    bit, as reading each step at once; with dropout, clipping at work, evaluations and checkpoints between."""
    config = make_config(data_dir, max_steps=12, save_every=4, keep_last=5, eval_every=6, grad_clip=0.5)
    config = type(config)(GPTConfig(**{**config.model.__dict__, "drop_rate": 0.1}), config.training, config.data)
    make_trainer(config, tmp_path / "at_once").fit()
    trainer = make_trainer(config, tmp_path / "deferred")
    trainer.defer_reads = True
    order = []
    queue_step, finish_step = trainer.queue_step, trainer.finish_step
    trainer.queue_step = lambda: order.append(("queue", trainer.step + 1)) or queue_step()
    trainer.finish_step = lambda queued: order.append(("finish", queued.step)) or finish_step(queued)
    trainer.fit()
    for key in ("train_loss", "grad_norm", "dt_ms"):
        assert sorted(metrics(tmp_path / "deferred", key)) == list(range(1, 13))
    for key in ("train_loss", "grad_norm", "val_loss"):
        assert metrics(tmp_path / "deferred", key) == metrics(tmp_path / "at_once", key)  # exact float equality
    assert max(metrics(tmp_path / "at_once", "grad_norm").values()) > 0.5  # the clipping scaled some steps
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "deferred" / "ckpt")] == [
        p.name for p in checkpoint.list_checkpoints(tmp_path / "at_once" / "ckpt")
    ]
    assert same_weights(tmp_path / "at_once", tmp_path / "deferred", 12)
    # step 1 was read after step 2 was queued; steps 4 and 8 (checkpoints) and 6 (evaluation) before the next
    assert order[:5] == [("queue", 1), ("queue", 2), ("finish", 1), ("queue", 3), ("finish", 2)]
    for step in (4, 6, 8):
        assert order.index(("finish", step)) < order.index(("queue", step + 1))
    assert order[-1] == ("finish", 12) and len(order) == 24


def test_checkpoint_layout_is_unwrapped_and_safe(data_dir, tmp_path):
    config = make_config(data_dir, max_steps=4, save_every=2, keep_last=1)
    make_trainer(config, tmp_path).fit()
    saved = checkpoint.list_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in saved] == ["step_000004"]  # keep_last=1 (the best is the last here)
    state = checkpoint.read_state(saved[0]).state
    assert state["step"] == 4 and state["config"]["model"]["vocab_size"] == 512 and state["loader"]["position"] == 16
    weights = checkpoint.load_model_state(saved[0])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    assert set(weights) == set(GPT(config.model).state_dict())
    assert checkpoint.load_tensors(saved[0], "optimizer.pt")["state"]  # loads with weights_only=True


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    config = make_config(data_dir, max_steps=6, save_every=3, keep_last=5)
    trainer = make_trainer(config, tmp_path)
    real_save = torch.save

    def crash_on_second_save(obj, path, *args, **kwargs):
        if "step_000006" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_second_save)
    with pytest.raises(OSError, match="simulated"):
        trainer.fit()
    assert checkpoint.latest(tmp_path / "ckpt").name == "step_000003"
    assert (tmp_path / "ckpt" / ".tmp-step_000006").exists()  # the partial save is not taken for a checkpoint
    monkeypatch.setattr(torch, "save", real_save)
    resumed = make_trainer(config, tmp_path, resume=True)
    assert resumed.step == 3


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """A process killed at a random moment while saving checkpoints in a loop: the latest one always loads."""
    script = f"""
import torch
from gpt2scratch import checkpoint
from gpt2scratch.models import GPT
from gpt2scratch.config import GPTConfig
model = GPT(GPTConfig(vocab_size=2048, context_length=64, emb_dim=256, n_heads=4, n_layers=4))
for step in range(1, 10000):
    checkpoint.save({str(tmp_path)!r}, step, model.state_dict(), {{"state": {{}}}}, [{{}}], {{"config": {{}}}})
    checkpoint.prune({str(tmp_path)!r}, 2, set())
"""
    for delay in (0.05, 0.23, 0.61):
        process = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while checkpoint.latest(tmp_path) is None and time.time() < deadline:  # saving has begun
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = checkpoint.latest(tmp_path)
        assert latest is not None
        state = checkpoint.load_model_state(latest)
        assert state["transformer.wte.weight"].shape == (2048, 256)
        checkpoint.load_tensors(latest, "optimizer.pt")


def test_corrupt_checkpoints_give_a_clear_error(data_dir, tmp_path):
    config = make_config(data_dir, max_steps=2, save_every=2)
    make_trainer(config, tmp_path).fit()
    path = checkpoint.latest(tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is truncated or corrupt"):
        make_trainer(config, tmp_path, resume=True)
    weights.write_bytes(data)
    (path / "optimizer.pt").write_bytes(b"not a zip file")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.pt is truncated or corrupt"):
        make_trainer(config, tmp_path, resume=True)
    (path / "state.json").write_text("{")
    with pytest.raises(checkpoint.CheckpointError, match="state.json is corrupt"):
        make_trainer(config, tmp_path, resume=True)


@pytest.mark.parametrize("defer_reads", [False, True], ids=["read-at-once", "deferred-reads"])
def test_non_finite_loss_is_skipped_then_stops_the_run(data_dir, tmp_path, caplog, defer_reads):
    """(deferred-reads: the GPU's way, each step read after the next is queued, the skip a flag on the device)"""
    config = make_config(data_dir, max_steps=20, save_every=2, keep_last=5)
    trainer = make_trainer(config, tmp_path)
    trainer.defer_reads = defer_reads
    real_step = trainer.queue_step

    def poisoned_step():
        if trainer.step == 4:  # from step 5 on, every loss is NaN
            with torch.no_grad():
                trainer.raw_model.transformer.ln_f.weight.fill_(float("nan"))
        return real_step()

    trainer.queue_step = poisoned_step
    with pytest.raises(TrainingError, match="5 non-finite losses in a row at step 9: the run diverged"):
        trainer.fit()
    assert "is not finite; skipping this update (1/5 in a row)" in caplog.text
    latest = checkpoint.latest(tmp_path / "ckpt")
    assert latest.name == "step_000004"  # no checkpoint is written while updates are being skipped
    assert all(torch.isfinite(v).all() for v in checkpoint.load_model_state(latest).values())


def test_contradictory_settings_are_rejected_before_work(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tokens_per_step \(1000\) must be a multiple of .* 256"):
        make_trainer(make_config(data_dir, tokens_per_step=1000), tmp_path)
    with pytest.raises(ValueError, match="--fsdp shards the model across ranks"):
        make_trainer(make_config(data_dir, fsdp=True), tmp_path)
    with pytest.raises(ValueError, match="warmup_steps \\(50\\) must not exceed max_steps \\(10\\)"):
        make_config(data_dir, warmup_steps=50, max_steps=10)
    result = run_cli("train", *TRAIN_ARGS, "--data-dir", str(data_dir), "--out", str(tmp_path / "r"), "--resume")
    assert result.returncode == 1 and "--resume: no checkpoint in" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("train", *TRAIN_ARGS, "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"))
    assert result.returncode == 1 and "does not exist; create it with `gpt2scratch prepare --out" in result.stderr


def test_cli_run_folder_export_and_sigkill_resume(data_dir, tmp_path):
    """The issue's check: a SIGKILLed run resumed with --resume logs the same train_loss as an uninterrupted one."""
    args = ["train", *TRAIN_ARGS, "--max-steps", "40", "--save-every", "5", "--eval-every", "10"]
    args += ["--data-dir", str(data_dir), "--drop-rate", "0.1"]
    full = run_cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    for name in ("metrics.jsonl", "loss.png", "run_config.json", "hf/config.json", "hf/model.safetensors"):
        assert (tmp_path / "full" / name).is_file(), name
    process = subprocess.Popen(
        [*COMMAND, *args, "--out", str(tmp_path / "killed")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(metrics_or_empty(tmp_path / "killed")) < 23:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < len(metrics_or_empty(tmp_path / "killed")) < 40
    again = run_cli(*args, "--out", str(tmp_path / "killed"))
    assert again.returncode == 1 and "holds checkpoints of an earlier run" in again.stderr
    resumed = run_cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "full")
    assert metrics(tmp_path / "killed", "val_loss") == metrics(tmp_path / "full", "val_loss")


def metrics_or_empty(run_dir) -> dict:
    try:
        return metrics(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_exported_folder_loads_in_transformers_with_our_logits(data_dir, tmp_path):
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

    trainer = make_trainer(make_config(data_dir, max_steps=3), tmp_path)
    trainer.fit()
    from gpt2scratch.hf import export_folder

    export_folder(trainer.raw_model.state_dict(), trainer.config.model, data_dir / "tokenizer", tmp_path / "hf")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    tokenizer = GPT2Tokenizer.from_pretrained(tmp_path / "hf")
    inputs = tokenizer.encode("To be, or not to be", return_tensors="pt")
    assert inputs[0].tolist() == trainer.tokenizer.encode("To be, or not to be")
    trainer.raw_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, trainer.raw_model(inputs)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_torchrun_two_processes_equal_one(data_dir, tmp_path):
    """Two gloo ranks at the same global batch log the same per-step train_loss as one process (within 1e-5)."""
    args = ["--preset", "tiny", "--max-steps", "8", "--eval-every", "4", "--batch-size", "2"]
    args += ["--tokens-per-step", "512", "--warmup-steps", "2", "--data-dir", str(data_dir), "--precision", "fp32"]
    a, b = train_one_and_two(args, tmp_path)
    assert a.keys() == b.keys() == set(range(1, 9))
    assert all(math.isclose(a[s], b[s], abs_tol=1e-5) for s in a), (a, b)
    va, vb = metrics(tmp_path / "one", "val_loss"), metrics(tmp_path / "two", "val_loss")
    assert all(math.isclose(va[s], vb[s], abs_tol=1e-5) for s in va), (va, vb)


def test_ctrl_c_saves_a_checkpoint_and_exits(data_dir, tmp_path):
    args = ["train", *TRAIN_ARGS, "--max-steps", "100000", "--save-every", "0", "--eval-every", "0"]
    process = subprocess.Popen(
        [*COMMAND, *args, "--data-dir", str(data_dir), "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(metrics_or_empty(tmp_path)) < 5:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    latest = checkpoint.latest(tmp_path / "ckpt")
    assert latest is not None and checkpoint.read_state(latest).step >= 5
    assert "Traceback" not in stderr


@pytest.mark.distributed
def test_torchrun_fsdp_two_processes_equal_one(data_dir, tmp_path):
    """--fsdp (FSDP2, gloo on CPU) trains to the same per-step losses as one process, and resumes."""
    args = ["--preset", "tiny", "--max-steps", "6", "--eval-every", "3", "--save-every", "3", "--batch-size", "2"]
    args += ["--tokens-per-step", "512", "--warmup-steps", "2", "--data-dir", str(data_dir), "--precision", "fp32"]
    one = run_cli("train", *args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun("train", *args, "--fsdp", "--out", str(tmp_path / "fsdp"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert all(math.isclose(a[s], b[s], abs_tol=1e-5) for s in a), (a, b)
    weights = checkpoint.load_model_state(checkpoint.latest(tmp_path / "fsdp" / "ckpt"))  # full, unsharded
    assert weights["transformer.wte.weight"].shape == (512, 64)


@pytest.mark.slow
def test_main_py_default_run_with_a_short_budget(tmp_path):
    """`python main.py` end to end (corpus preparation, cpu preset, time budget, samples, export), in 0.5 min.

    (0.3 min failed twice in fresh-clone CI runs on 2026-11-27. Reproduced once in a partial suite run: the
    budget's calibration took ~10 s of the 18 instead of ~5 (a slow spell: 3.5 s per evaluation instead of 2),
    which left 4 steps, too few to learn; the CPU plans timed at the first step take ~0.7 s of it.)"""
    from pathlib import Path

    main_py = Path(__file__).resolve().parent.parent / "main.py"
    result = subprocess.run(
        [sys.executable, str(main_py), "--out", "run", "--time-budget", "0.5", "--eval-every", "20"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "data" / "shakespeare-bpe16384" / "manifest.json").is_file()
    assert "time budget 0.5 min" in result.stderr and "done:" in result.stdout
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_bpb" in r]
    assert evals and all({"step", "val_loss", "val_bpb"} <= r.keys() for r in evals)
    assert evals[-1]["val_bpb"] < 3.5  # learned: a uniform guess over 16384 tokens is 14 bits / 3.6 bytes = 3.9
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()

    # ... and `gpt2scratch serve` serves what it left: the run (its latest checkpoint) and its Hugging Face folder
    from fastapi.testclient import TestClient

    from gpt2scratch import loading
    from gpt2scratch.generation import complete
    from gpt2scratch.serve import build_app

    for source in (tmp_path / "run", tmp_path / "run" / "hf"):
        loaded = loading.load(str(source))
        alone = complete(loaded.model, loaded.tokenizer, ["ROMEO:\n"], 30, temperature=0)[0]
        with TestClient(build_app(loaded)) as client:
            answer = client.post("/v1/completions", json={"prompt": "ROMEO:\n", "max_tokens": 30, "temperature": 0})
            assert answer.status_code == 200 and answer.json()["model"] == "run"
            assert answer.json()["choices"][0]["text"] == alone


def test_resume_with_fewer_steps_than_the_presets_warmup(data_dir, tmp_path):
    """--resume --max-steps N on a run of the default (cpu) preset, whose warm-up (50) exceeds N: the checkpoint's
    config is the one resumed, and a max_steps under a warm-up scales it instead of refusing."""
    args = ["train", "--data-dir", str(data_dir), "--out", str(tmp_path), "--time-budget", "0", "--batch-size", "4"]
    args += ["--tokens-per-step", "0", "--eval-every", "3", "--save-every", "3"]
    first = run_cli(*args, "--max-steps", "6")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "max_steps 6 is below warmup_steps 50; warm-up scaled to 0 steps" in first.stderr
    resumed = run_cli(*args, "--max-steps", "10", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "warm-up scaled" not in resumed.stderr  # the preset's warm-up plays no part in a resumed run
    assert sorted(metrics(tmp_path)) == list(range(1, 11))
    assert json.loads((tmp_path / "run_config.json").read_text())["training"]["max_steps"] == 10


def test_a_checkpoint_that_lacks_a_tensor_is_refused_before_loading(data_dir, tmp_path):
    """torch's set_model_state_dict ignores missing keys: the key set and shapes are compared first."""
    from safetensors.torch import load_file, save_file

    make_trainer(make_config(data_dir, max_steps=4, save_every=2, keep_last=5), tmp_path).fit()
    weights_file = tmp_path / "ckpt" / "step_000004" / "model.safetensors"
    weights = load_file(weights_file)
    del weights["transformer.h.0.attn.c_attn.weight"]
    save_file(weights, weights_file)
    config = make_config(data_dir, max_steps=6, save_every=2, keep_last=5)
    with pytest.raises(checkpoint.CheckpointError) as error:
        make_trainer(config, tmp_path, resume=True)
    assert "does not fit the model (missing: transformer.h.0.attn.c_attn.weight)" in str(error.value)
    assert str(error.value).endswith(f"--resume {tmp_path / 'ckpt' / 'step_000002'}")


def test_resume_from_a_named_checkpoint_when_the_latest_is_damaged(data_dir, tmp_path):
    """The message names the earlier checkpoint, and `--resume CKPT` continues from it, bit for bit."""
    args = ["train", *TRAIN_ARGS, "--max-steps", "8", "--save-every", "2", "--keep-last", "10", "--eval-every", "4"]
    args += ["--data-dir", str(data_dir), "--drop-rate", "0.1"]
    assert run_cli(*args, "--out", str(tmp_path / "full")).returncode == 0
    shutil.copytree(tmp_path / "full", tmp_path / "damaged")
    (tmp_path / "damaged" / "ckpt" / "step_000008" / "optimizer.pt").write_bytes(b"not a zip")
    refused = run_cli(*args, "--out", str(tmp_path / "damaged"), "--resume")
    earlier = tmp_path / "damaged" / "ckpt" / "step_000006"
    assert refused.returncode == 1 and refused.stderr.strip().endswith(f"--resume {earlier}"), refused.stderr
    assert "Traceback" not in refused.stderr and refused.stderr.strip().splitlines()[-1].startswith(
        "gpt2scratch train: error:"
    )
    (tmp_path / "damaged" / "metrics.jsonl").write_text("")  # forget what the first run logged
    resumed = run_cli(*args, "--resume", str(earlier))  # the run folder follows from the checkpoint's path
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, again = metrics(tmp_path / "full"), metrics(tmp_path / "damaged")
    norms = {run: metrics(tmp_path / run, "grad_norm") for run in ("full", "damaged")}
    weights_equal = same_weights(tmp_path / "full", tmp_path / "damaged", 8)
    seen = f"losses {full} vs {again}; grad norms {norms}; step 8 weights equal: {weights_equal}"
    assert [again[s] for s in (7, 8)] == [full[s] for s in (7, 8)] and weights_equal, seen


def test_non_finite_weights_are_never_checkpointed(data_dir, tmp_path):
    """An update that leaves NaN in the weights while the loss is still finite: no checkpoint holds it."""
    trainer = make_trainer(make_config(data_dir, max_steps=10, save_every=1, keep_last=10), tmp_path)
    optimizer = trainer.optimizers[0]  # AdamW (the config's optimizer)
    real_step = optimizer.step

    def exploding_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if trainer.step == 2:  # the update of step 3
            with torch.no_grad():
                trainer.raw_model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
        return result

    optimizer.step = exploding_step
    with pytest.raises(TrainingError, match="the weights are not finite at step 3: the run diverged"):
        trainer.fit()
    assert checkpoint.latest(tmp_path / "ckpt").name == "step_000002"
    assert all(
        torch.isfinite(v).all() for v in checkpoint.load_model_state(checkpoint.latest(tmp_path / "ckpt")).values()
    )


@pytest.mark.parametrize(
    "failure",
    [OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")],
    ids=["oserror", "torch-zip-writer"],
)
def test_a_full_disk_during_a_save_says_so_once(data_dir, tmp_path, monkeypatch, failure):
    import shutil as shutil_module

    trainer = make_trainer(make_config(data_dir, max_steps=4, save_every=2, keep_last=5), tmp_path)
    real_save, real_usage = torch.save, shutil_module.disk_usage

    def save(obj, path, *args, **kwargs):
        if "step_000004" in str(path):
            monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real_usage(p)._replace(free=0))
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as error:
        trainer.fit()
    assert "step_000004" in str(error.value) and "--resume" in str(error.value)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_000002"]  # the partial save is removed


def test_overwrite_deletes_the_checkpoints_and_nothing_else(data_dir, tmp_path):
    """--overwrite (what `make run` passes) starts over: the earlier run's checkpoints, a save's leftover .tmp-
    folder and the run's logs go; other files in ckpt/ (the repository's ckpt/README.md) stay."""
    args = ["train", *TRAIN_ARGS, "--max-steps", "4", "--warmup-steps", "1", "--save-every", "2", "--eval-every", "0"]
    args += ["--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert run_cli(*args).returncode == 0
    ckpt = tmp_path / "ckpt"
    assert [p.name for p in checkpoint.list_checkpoints(ckpt)] == ["step_000002", "step_000004"]
    (ckpt / "README.md").write_text("kept\n")
    (ckpt / "notes").mkdir()
    (ckpt / ".tmp-step_000006").mkdir()  # a save killed half-way
    (ckpt / "step_000004" / "extra.txt").write_text("goes with its checkpoint")
    again = run_cli(*args[:-1], str(tmp_path), "--max-steps", "2", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert [p.name for p in checkpoint.list_checkpoints(ckpt)] == ["step_000002"]  # the new run's only
    assert sorted(p.name for p in ckpt.iterdir()) == ["README.md", "notes", "step_000002"]
    assert (ckpt / "README.md").read_text() == "kept\n"
    assert max(metrics(tmp_path)) == 2  # the log restarted
