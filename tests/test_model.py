"""The model against references: transformers' GPT2LMHeadModel on the same weights, and GPT-2's own numbers."""

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_config
from gpt2scratch.config import GPTConfig, resolve_config
from gpt2scratch.estimates import n_params
from gpt2scratch.hf import config_from_hf, from_hf_state_dict, hf_model_from_gpt
from gpt2scratch.models import GPT
from gpt2scratch.models.gelu import GELU, gelu_tanh_reference


def _random_hf_model(tie: bool):
    """A random-init tiny GPT-2 from transformers, with non-zero biases and LayerNorm params."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4, tie_word_embeddings=tie,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=100, eos_token_id=100,
    )  # fmt: skip
    hf = GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF inits biases to zero and LN to ones: randomise so that they are tested too
        for name, param in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_logits_and_loss_equal_transformers(tie):
    """Failure means our forward pass is not GPT-2's (layout, GELU, LayerNorm eps, mask or transposes)."""
    hf = _random_hf_model(tie)
    config = config_from_hf(hf.config)
    assert config.weight_tying is tie and config.qkv_bias
    model = GPT(config).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    if tie:
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 101, (3, 32))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
        assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # HF shifts labels inside the model; ours takes targets already shifted.
        _, our_loss = model(idx[:, :-1], targets=idx[:, 1:])
        hf_loss = hf(idx, labels=idx).loss
        assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qkv_bias,tie", [(False, False), (True, True), (False, True)])
def test_our_weights_in_transformers_give_our_logits(qkv_bias, tie):
    """Failure means our -> HF conversion (including the seed's untied, bias-free default) is wrong."""
    model = GPT(tiny_config(qkv_bias=qkv_bias, weight_tying=tie)).eval()
    hf = hf_model_from_gpt(model)
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert_close(model(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_parameter_counts_match_openai_and_the_seed():
    """GPT-2 small has 124,439,808 parameters; the seed's config (untied, no qkv bias) 163,009,536."""
    assert n_params(resolve_config("gpt2").model) == 124_439_808
    assert n_params(GPTConfig()) == 163_009_536
    assert GPT(resolve_config("gpt2").model).num_params() == 124_439_808


@pytest.mark.parametrize(
    "overrides", [{}, {"qkv_bias": True}, {"weight_tying": True}, {"qkv_bias": True, "weight_tying": True}]
)
def test_analytic_parameter_count_equals_the_module(overrides):
    config = tiny_config(**overrides)
    assert n_params(config) == GPT(config).num_params()


def test_causality():
    """Changing token t+1 must leave the logits at positions <= t unchanged (no peeking at the future)."""
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 101, (2, 32))
    t = 17
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 101
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(before[:, t + 1], after[:, t + 1])


def test_reference_attention_equals_sdpa():
    """The readable masked_fill path and the fused SDPA path are the same function."""
    config = tiny_config()
    fast = GPT(config, attn_impl="sdpa").eval()
    reference = GPT(config, attn_impl="reference").eval()
    reference.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        assert_close(fast(idx)[0], reference(idx)[0], rtol=1e-5, atol=1e-5)


def test_kv_cache_logits_equal_full_recompute():
    """Prefill then one token at a time with the cache gives the logits of the full forward pass."""
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        full, _ = model(idx)
        for impl in ("sdpa", "reference"):
            for block in model.transformer.h:
                block.attn.attn_impl = impl
            caches = model.new_kv_caches()
            parts = [model(idx[:, :10], caches=caches)[0], model(idx[:, 10:13], caches=caches)[0]]
            parts += [model(idx[:, t : t + 1], caches=caches)[0] for t in range(13, 24)]
            assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_last_only_gives_the_last_positions_logits():
    """last_only (what decoding asks after a prompt) equals the full pass's last position, padded rows included."""
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 101, (3, 12))
    pad = torch.tensor([0, 4, 11])
    with torch.no_grad():
        full, _ = model(idx, caches=model.new_kv_caches(), pad_lengths=pad)
        last, _ = model(idx, caches=model.new_kv_caches(), pad_lengths=pad, last_only=True)
    assert last.shape == (3, 1, 101)
    assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_gelu_is_the_tanh_approximation():
    x = torch.linspace(-6, 6, 1001)
    assert_close(GELU()(x), gelu_tanh_reference(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(GELU()(x), torch.nn.functional.gelu(x), atol=1e-5)  # not the exact erf GELU


def test_gpt2_initialisation():
    """Normal(0, 0.02) matrices and embeddings, residual projections 0.02/sqrt(2 n_layers), zero biases."""
    config = GPTConfig(vocab_size=2000, context_length=256, emb_dim=256, n_heads=4, n_layers=8, qkv_bias=True)
    model = GPT(config)
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(model.transformer.wte.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.transformer.wpe.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.transformer.h[0].mlp.c_fc.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.transformer.h[0].attn.c_proj.weight) == pytest.approx(0.02 / 4, rel=0.05)
    assert std(model.transformer.h[3].mlp.c_proj.weight) == pytest.approx(0.02 / 4, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0
    assert model.lm_head.bias is None
    assert model.transformer.h[0].ln_1.weight.eq(1).all()
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()  # untied by default


def test_loss_at_init_is_near_uniform():
    """A fresh model predicts roughly uniformly: loss ~ ln(vocab_size)."""
    model = GPT(tiny_config(vocab_size=1000)).eval()
    idx = torch.randint(0, 1000, (4, 32))
    _, loss = model(idx, targets=idx)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(1000.0)).item(), rel=0.05)


@pytest.mark.parametrize(
    "idx,message",
    [
        (torch.zeros(1, 33, dtype=torch.long), "longer than the context length"),
        (torch.tensor([[1, 2, 101]]), r"token ids must be in \[0, 101\)"),
        (torch.tensor([[1, -1]]), r"token ids must be in \[0, 101\)"),
        (torch.zeros(5, dtype=torch.long), "must be a \\(batch, time\\) tensor"),
        (torch.zeros(1, 5), "must be a \\(batch, time\\) tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(idx, message):
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(idx)
