"""CPU matmul plans: split products equal whole ones, the choice is timed, and a resumed run restores the choices."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2scratch import checkpoint
from gpt2scratch.config import TrainingConfig, resolve_config
from gpt2scratch.dataset.data_module import DataModule
from gpt2scratch.models import cpu_matmul
from gpt2scratch.models.linear import Linear
from gpt2scratch.runtime import Runtime
from gpt2scratch.testing import read_metrics, same_weights
from gpt2scratch.trainer import Trainer


@pytest.fixture
def fresh_plans(monkeypatch):
    """An empty plan table for the test (the process-wide one is left as it was)."""
    monkeypatch.setattr(cpu_matmul, "_plans", {})


@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("parts", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
def test_split_products_equal_the_whole_one(layout, parts, with_bias):
    torch.manual_seed(0)
    M, K, N = 600, 96, 80  # rows not a multiple of the blocks: the last block is shorter
    a = torch.randn(M, K) if layout[0] == "n" else torch.randn(K, M).t()
    b = torch.randn(K, N) if layout[1] == "n" else torch.randn(N, K).t()
    bias = torch.randn(N) if with_bias else None
    a, b, bias = (None if t is None else t.to(torch.bfloat16) for t in (a, b, bias))
    got = cpu_matmul._split_mm(a, b, bias, parts)
    exact = a.double() @ b.double() + (0 if bias is None else bias.double())
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-2)  # bf16 rounding of the result
    if parts == 1:  # whole: exactly the product autocast would compute
        assert torch.equal(got, a @ b if bias is None else torch.addmm(bias, a, b))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    inner=st.integers(1, 40),
    cols=st.integers(1, 40),
    layout=st.sampled_from(["nn", "nt", "tn", "tt"]),
    parts=st.sampled_from([1, 2, 3, 4, 7]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_split_products_are_the_whole_product_on_any_shape(rows, inner, cols, layout, parts, with_bias, seed):
    """Any shape and number of blocks (more blocks than rows included): the rows of a @ b + bias, each computed
    whole by one block: in fp64 equal to the whole product to rounding."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, inner, generator=generator, dtype=torch.float64)
    b = torch.randn(inner, cols, generator=generator, dtype=torch.float64)
    a = a if layout[0] == "n" else a.t().contiguous().t()
    b = b if layout[1] == "n" else b.t().contiguous().t()
    bias = torch.randn(cols, generator=generator, dtype=torch.float64) if with_bias else None
    got = cpu_matmul._split_mm(a, b, bias, parts)
    assert got.shape == (rows, cols)
    torch.testing.assert_close(got, a @ b + (0 if bias is None else bias), rtol=1e-12, atol=1e-12)


def test_the_choice_is_timed_and_a_split_must_win_by_the_margin(fresh_plans, monkeypatch):
    clock = [0.0]
    costs = {}
    monkeypatch.setattr(cpu_matmul.time, "perf_counter", lambda: clock[0])

    def fake_split_mm(a, b, bias, parts):  # advances the clock by this split's cost
        clock[0] += costs[parts]
        return torch.zeros(a.size(0), b.size(1))

    monkeypatch.setattr(cpu_matmul, "_split_mm", fake_split_mm)
    a, b = torch.zeros(1024, 768, dtype=torch.bfloat16), torch.zeros(768, 3072, dtype=torch.bfloat16)
    costs.update({1: 10.0, 2: 8.0})
    assert cpu_matmul._choose(a, b, None) == 2
    costs.update({1: 10.0, 2: 9.5})  # within the margin: stays whole
    assert cpu_matmul._choose(a, b, None) == 1
    small = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert cpu_matmul._choose(small, small, None) == 1  # too small to time: whole

    def candidate(cost):  # one way of doing the work, taking `cost` seconds
        return lambda: clock.__setitem__(0, clock[0] + cost)

    assert cpu_matmul._fastest([candidate(10.0), candidate(9.5), candidate(5.0)]) == 2
    assert cpu_matmul._fastest([candidate(10.0), candidate(9.5), candidate(9.2)]) == 0  # none wins by the margin
    # mm chooses once per shape and remembers the choice; plans() / set_plans() carry it
    costs.update({1: 10.0, 2: 8.0})
    cpu_matmul.mm(a, b)
    (key,) = cpu_matmul.plans()
    costs.update({1: 1.0, 2: 10.0})
    cpu_matmul.mm(a, b)
    assert cpu_matmul.plans() == {key: 2}
    cpu_matmul.set_plans({key: 1})
    assert cpu_matmul.plans() == {key: 1}


@pytest.mark.parametrize("parts", [1, 2])
def test_linear_under_bf16_autocast_is_autocasts_linear(fresh_plans, monkeypatch, parts):
    """Whole products: the output and every gradient bit for bit those of F.linear under autocast; split: the same
    to bf16 rounding."""
    monkeypatch.setattr(cpu_matmul, "_choose", lambda a, b, bias: parts)
    torch.manual_seed(0)
    ours = Linear(96, 80)
    x = torch.randn(3, 200, 96, requires_grad=True)
    grad_out = torch.randn(3, 200, 80)
    results = []
    for planned in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x) if planned else F.linear(x, ours.weight, ours.bias)
        y.backward(grad_out.to(y.dtype))
        results.append([y, x.grad, ours.weight.grad, ours.bias.grad])
        x.grad = ours.weight.grad = ours.bias.grad = None
    assert len(cpu_matmul.plans()) == 3  # forward, grad_x, grad_W
    for got, expected in zip(*results, strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if parts == 1:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_resume_restores_the_matmul_plans(hamlet_data, tmp_path, monkeypatch):
    """bf16 autocast training, N steps == N/2 + resume + N/2, where the resumed process would choose other splits
    and the other attention than the first one did: the checkpoint's plans are what it computes with."""
    monkeypatch.setattr(cpu_matmul, "MIN_ROWS", 16)
    monkeypatch.setattr(cpu_matmul, "MIN_WORK", 0)
    config = resolve_config("tiny", overrides={"model": {"vocab_size": 512}, "data": {"dir": str(hamlet_data)}})
    training = TrainingConfig(tokens_per_step=0, batch_size=4, warmup_steps=2, max_steps=12, eval_every=6,
                              sample_every=0, save_every=6, keep_last=5, precision="bf16")  # fmt: skip
    config = type(config)(config.model, training, config.data)

    def fit(run_dir, choose, attention, resume=False):
        monkeypatch.setattr(cpu_matmul, "_plans", {})  # a new process
        monkeypatch.setattr(cpu_matmul, "_choose", choose)  # row blocks of each product
        monkeypatch.setattr(cpu_matmul, "_fastest", lambda candidates: attention)  # flash (0) or written out (1)
        data = DataModule(config.data.dir, config.model.context_length, training.batch_size)
        Trainer(config, run_dir, Runtime(torch.device("cpu"), "bf16", compile=False), data, resume=resume).fit()
        return cpu_matmul.plans()

    fit(tmp_path / "full", lambda a, b, bias: 4 if a.size(0) % 4 == 0 else 2, attention=1)
    saved = checkpoint.load_tensors(tmp_path / "full" / "ckpt" / "step_000006", "rng.pt")[0]["matmul_plans"]
    attention = {key: choice for key, choice in saved.items() if key.startswith("attention")}
    assert attention == {f"attention torch.bfloat16 4x2x64x32 {torch.get_num_threads()} threads": 1}
    assert set(saved.values()) == {1, 4}  # the training step's products (its rows: 4 x 64) and its attention
    (tmp_path / "half" / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "ckpt" / "step_000006", tmp_path / "half" / "ckpt" / "step_000006")
    resumed = fit(tmp_path / "half", lambda a, b, bias: 1, attention=0, resume=True)
    assert {key: resumed[key] for key in saved} == saved
    full, half = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    assert [half[s] for s in range(7, 13)] == [full[s] for s in range(7, 13)]
    assert same_weights(tmp_path / "full", tmp_path / "half", 12)
