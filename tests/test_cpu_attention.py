"""Causal attention for CPU training (models/cpu_attention.py): the written-out path is attention, and the plan
picks between it and the flash kernel without touching the run's random numbers."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from gpt2scratch.config import GPTConfig
from gpt2scratch.models import GPT, cpu_attention, cpu_matmul
from gpt2scratch.models.cpu_attention import CausalAttention, causal_attention


@pytest.fixture
def fresh_plans(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_plans", {})


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    T=st.integers(1, 70),
    hs=st.sampled_from([1, 8, 16, 24]),
    seed=st.integers(0, 2**16),
)
def test_written_out_attention_is_causal_attention(batch, heads, T, hs, seed):
    """fp64: the values and the gradients of q, k and v equal the SDPA reference's (is_causal) to rounding."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, T, hs, generator=generator, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(batch, heads, T, hs, generator=generator, dtype=torch.float64)
    results = []
    for attention in (CausalAttention.apply, lambda *a: F.scaled_dot_product_attention(*a, is_causal=True)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad_out)))
    for ours, reference in zip(*results, strict=True):
        assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_written_out_attention_under_bf16_autocast():
    """bf16 scores and probabilities, fp32 sums in the softmax: the fp64 result to bf16 rounding, in bf16, and the
    gradients in the inputs' dtypes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 32, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", torch.bfloat16):
        out = CausalAttention.apply(q, k, v)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*exact, is_causal=True)
    assert_close(out.double(), reference, rtol=0.05, atol=0.05)
    for grad, expected in zip(grads, torch.autograd.grad(reference.sum(), exact), strict=True):
        assert grad.dtype == torch.float32
        assert_close(grad.double(), expected, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("choice", [0, 1])
def test_training_takes_the_planned_attention(fresh_plans, monkeypatch, choice):
    """The plan's choice is what a training forward runs (0: the flash kernel, 1: written out); it is timed once per
    shape, and neither evaluation nor a shape over MAX_SCORES times anything."""
    timings, written_out = [], []
    monkeypatch.setattr(cpu_matmul, "_fastest", lambda candidates: timings.append(len(candidates)) or choice)
    original = CausalAttention.apply
    monkeypatch.setattr(CausalAttention, "apply", lambda *a: written_out.append(1) or original(*a))
    config = GPTConfig(vocab_size=100, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    model = GPT(config).train()
    x = torch.randint(0, 100, (3, 32))
    for _ in range(2):
        model(x, x)[1].backward()
    assert timings == [2] and len(written_out) == 4 * choice  # two layers, two steps
    with torch.no_grad():
        model(x, x)
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    monkeypatch.setattr(cpu_attention, "MAX_SCORES", 63)
    causal_attention(q, q, q)
    assert timings == [2] and len(written_out) == 4 * choice


def test_timing_the_choice_draws_no_random_numbers(fresh_plans):
    """The first training step of a shape times both ways; the run's random stream (dropout, data) is untouched."""
    q, k, v = (torch.randn(2, 2, 64, 16, requires_grad=True) for _ in range(3))
    state = torch.get_rng_state()
    causal_attention(q, k, v)
    assert any(key.startswith("attention") for key in cpu_matmul.plans())
    assert torch.equal(torch.get_rng_state(), state)
