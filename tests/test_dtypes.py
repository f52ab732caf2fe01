"""Decoding in bf16, int8 and int8-dynamic (`--dtype`, quantization.py) against fp32, on a model that learned
something (a random model's near-uniform logits would agree with anything): top-1 agreement and val loss under
teacher forcing."""

import json
import sys
from pathlib import Path

import pytest
import torch

from gpt2scratch import loading
from gpt2scratch.dataset.dataset import TokenSplit
from gpt2scratch.generation import compile_decoding, decoding_step, generate_ids
from gpt2scratch.quantization import Int8DynamicLinear, Int8Linear, apply_dtype, pick_dtype
from gpt2scratch.testing import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from dtype_quality import teacher_forced  # noqa: E402  (the benchmark's measure, tested here)

# (top-1 agreement with fp32 at least, val loss within this fraction of fp32's): the issue's bars
BARS = {"bf16": (0.99, 0.005), "int8": (0.98, 0.02), "int8-dynamic": (0.98, 0.02)}


def train_mini(hamlet_data, out, *options: str):
    args = ["--preset", "mini", "--max-steps", "300", "--tokens-per-step", "0", "--batch-size", "8"]
    args += ["--eval-every", "0", "--sample-every", "0", "--precision", "fp32", "--data-dir", str(hamlet_data)]
    result = run_cli("train", *args, *options, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def trained(hamlet_data, tmp_path_factory):
    """The `mini` shape trained for 300 steps on Hamlet (val loss 3.69 on the split, from 6.2 at the start)."""
    return train_mini(hamlet_data, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def trained_block(hamlet_data, tmp_path_factory):
    """`mini` with one block, trained the same way (val loss 3.65 on the split): what the compiled-decoding tests
    compile. Inductor's compile time grows with the blocks (4 blocks took 176 s for the int8 test, 1 block 67 s),
    and what they test is the same for one block as for four."""
    return train_mini(hamlet_data, tmp_path_factory.mktemp("trained_block"), "--n-layers", "1")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "int8", "int8-dynamic"])
def test_reduced_precision_agrees_with_fp32(trained, hamlet_data, dtype):
    split = TokenSplit(hamlet_data, "val")
    reference = loading.load(str(trained), dtype="fp32")
    low = loading.load(str(trained), dtype=dtype)
    assert low.dtype == dtype and reference.model.num_params() == low.model.num_params()
    if dtype.startswith("int8"):
        kind = Int8Linear if dtype == "int8" else Int8DynamicLinear
        assert type(low.model.lm_head.head) is kind and low.model.lm_head.weight.dtype == torch.int8
        assert all(type(block.mlp.c_proj) is kind for block in low.model.transformer.h)
    top1_ref, loss_ref = teacher_forced(reference.model, split, 24)
    top1, loss = teacher_forced(low.model, split, 24)
    agreement = (top1 == top1_ref).float().mean().item()
    min_agreement, loss_tolerance = BARS[dtype]
    print(f"{dtype}: top-1 agreement {agreement:.4f}, val loss {loss:.4f} vs fp32 {loss_ref:.4f}")
    assert loss_ref < 5.0  # it learned
    assert agreement >= min_agreement
    assert abs(loss - loss_ref) <= loss_tolerance * loss_ref
    prompt = [reference.tokenizer.encode("To be, or not to be")]
    assert len(generate_ids(low.model, prompt, 20, temperature=0)[0]) == 20  # and it decodes


def test_fp32_is_the_model_as_trained(trained):
    """--dtype fp32 changes nothing: greedy output bit-identical to a plain load (what generate did before)."""
    plain = loading.load(str(trained))
    fp32 = loading.load(str(trained), dtype="fp32")
    a, b = plain.model.state_dict(), fp32.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompt = [plain.tokenizer.encode("Hamlet")]
    assert generate_ids(plain.model, prompt, 30, temperature=0) == generate_ids(fp32.model, prompt, 30, temperature=0)


def test_int8_linear_pads_rows_and_returns_the_layers_shape():
    """Rows padded to a multiple of 64 for the kernels, none of them in the output; the product is the rounded
    weights' (per-row scales), within bf16's rounding of the input."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 100)
    int8 = Int8Linear(linear)
    assert int8.weight.shape == (128, 48) and not int8.weight[100:].any()
    x = torch.randn(2, 5, 48)
    rounded = int8.weight[:100].float() * int8.scales[:100, None].float()
    expected = torch.nn.functional.linear(x.bfloat16().float(), rounded, linear.bias)
    got = int8(x)
    assert got.shape == (2, 5, 100)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("emulated", [True, False])
def test_int8_linear_widens_a_prompts_product_where_bf16_is_emulated(emulated, monkeypatch):
    """On a CPU without bf16 instructions, WIDENED_ROWS rows or more (a prompt) multiply by the int8 weight
    widened to fp32: the rounded input times the rounded weight to fp32 accuracy, where the kernel's output is
    rounded to bf16. Fewer rows, a CPU with bf16, or a compiled graph keep the kernel, bit for bit."""
    from gpt2scratch import quantization

    monkeypatch.setattr(quantization, "_bf16_emulated", lambda: emulated)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    int8 = Int8Linear(linear)
    rounded = int8.weight.double() * int8.scales[:, None].double()  # (256, 96): padded rows are zero
    for rows in (quantization.WIDENED_ROWS - 1, quantization.WIDENED_ROWS, 300):
        x = torch.randn(rows, 96)
        kernel = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), int8.weight, int8.scales)
        got = int8.product(x)
        exact = x.bfloat16().double() @ rounded.t()
        if emulated and rows >= quantization.WIDENED_ROWS:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(kernel.double(), exact, rtol=1e-5, atol=1e-5)  # the kernel's is rounder
        else:
            assert torch.equal(got, kernel)
        torch.testing.assert_close(int8(x), linear(x), rtol=0.05, atol=0.05)  # and near the unrounded layer
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inductor picks its own kernels
    assert torch.equal(int8.product(x), torch.ops.aten._weight_int8pack_mm(x.bfloat16(), int8.weight, int8.scales))


@pytest.mark.parametrize("packs", [True, False])
def test_bf16_linear_takes_the_product_measured_fastest_with_f_linears_values(packs, monkeypatch):
    """Where BF16Linear packs its weight for oneDNN (a CPU with avx512_bf16, no AMX), every row count gets
    F.linear's bf16 product bit for bit, from the packed copy; elsewhere one row goes through torch.mv (to bf16
    rounding of F.linear) and more rows through F.linear. Failure in the first case means the packed product
    computes something else than F.linear; in the second, that the mv path is wrong."""
    from gpt2scratch import quantization
    from gpt2scratch.quantization import BF16Linear
    from gpt2scratch.runtime import cpu_has_native_bf16

    monkeypatch.setattr(quantization, "_packs_bf16", lambda: packs)
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    layer = BF16Linear.from_linear(linear)
    weight = linear.weight.bfloat16()
    with torch.inference_mode():
        for shape in [(1, 1, 96), (5, 1, 96), (1, 7, 96), (3, 96)]:
            x = torch.randn(shape)
            expected = torch.nn.functional.linear(x.bfloat16(), weight)
            got = layer.product(x.bfloat16())
            if packs or x.numel() > 96:
                assert torch.equal(got, expected), shape
            else:
                torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(layer(x), linear(x), rtol=3e-2, atol=3e-2)
            assert layer(x).dtype == torch.float32
    if packs and cpu_has_native_bf16():
        assert layer._packed[1] is not None, "the product did not take the packed weight"
    assert not hasattr(layer, "_packed") or packs


def test_int8_dynamic_linear_is_the_product_of_the_rounded_input_and_weight():
    """Each input row rounded to 256 levels between its own minimum and maximum (zero included), times the int8
    weight: the integer product is exact, so the result is that of the rounded values in float64, and a row's
    result does not depend on the rows beside it (bit for bit)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 100)
    layer = Int8DynamicLinear(linear)
    assert layer.weight.shape == (128, 48) and layer.weight.dtype == torch.int8
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    x[0, 0] = x[0, 0].abs()  # a row with no negative values: its range starts at zero
    x[1, 1] = 0  # a row of zeros
    low = x.amin(-1, keepdim=True).clamp(max=0)
    scale = (x.amax(-1, keepdim=True).clamp(min=0) - low) / 255
    zero = torch.round(-low / scale.clamp(min=1e-300))
    rounded_x = (torch.clamp(torch.round(x / scale.clamp(min=1e-300)) + zero, 0, 255) - zero) * scale
    rounded_w = Int8Linear(linear).weight[:100].double() * layer.scales[:100, None].double()
    expected = torch.nn.functional.linear(rounded_x, rounded_w, linear.bias.double())
    got = layer(x.float())
    assert got.shape == (3, 5, 100) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert not got[1, 1].sub(linear.bias).any()  # zeros in, the bias out
    flat = x.float().view(15, 48)
    together = layer(flat)
    assert all(torch.equal(layer(flat[i : i + 1]), together[i : i + 1]) for i in range(15))
    torch.testing.assert_close(got, linear(x.float()), rtol=0.05, atol=0.05)  # and near the unrounded product


@pytest.mark.parametrize("emulated", [True, False])
def test_int8_dynamic_multiplies_in_fp32_where_int8_products_are_emulated(emulated, monkeypatch):
    """On a CPU without VNNI / AMX int8 instructions the integer product is taken in fp32, in pieces of
    EXACT_INPUTS inputs, each exact: the same integers as _int_mm's, so the same result bit for bit, also where
    inputs and weights share their signs and a sum over all 3,072 inputs passes 2^24 (one fp32 product is off)."""
    from gpt2scratch import quantization

    monkeypatch.setattr(quantization, "_int8_emulated", lambda: emulated)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    torch.manual_seed(0)
    gpt2_like = torch.nn.Linear(3072, 96)
    torch.nn.init.normal_(gpt2_like.weight, std=0.02)
    signs = torch.randint(0, 2, (3072,)) * 2 - 1
    aligned = torch.nn.Linear(3072, 96)
    with torch.no_grad():
        aligned.weight.copy_(signs * (0.8 + 0.2 * torch.rand(96, 3072)))
    for linear, x in ((gpt2_like, torch.randn(40, 3072) * 3), (aligned, signs * (0.8 + 0.2 * torch.rand(40, 3072)))):
        layer = Int8DynamicLinear(linear)
        assert layer.widened == emulated
        calls.clear()
        got = layer(x)
        assert bool(calls) != emulated
        monkeypatch.setattr(layer, "widened", False)
        assert torch.equal(got, layer(x))  # _int_mm's result
    big = signs * (100 + torch.randint(0, 28, (40, 3072)))  # as the aligned layer's quantized inputs are
    weight = layer.weight[:96].int()
    exact = big.long() @ weight.long().t()
    assert exact.max() > 2**24 and not torch.equal(torch.mm(big.float(), weight.float().t()).long(), exact)


def test_auto_says_what_it_chose(trained):
    dtype, reason = pick_dtype("auto", torch.device("cpu"))
    assert dtype in ("bf16", "fp32") and reason
    if dtype == "fp32":  # a CPU without bf16 instructions: the message points to the dtype that decodes faster there
        assert "--dtype int8" in reason
    assert pick_dtype("auto", torch.device("cuda"))[0] == "fp32"  # measured faster there (README, "Decoding")
    result = run_cli("generate", str(trained), "--prompt", "To be", "--max-new-tokens", "5", "--temperature", "0")
    assert result.returncode == 0 and result.stdout.startswith("To be")
    assert f"dtype: {dtype} (" in result.stderr
    with pytest.raises(ValueError, match="not one of"):
        pick_dtype("int4", torch.device("cpu"))
    bad = run_cli("generate", str(trained), "--dtype", "int4")
    assert bad.returncode != 0 and "int4" in bad.stderr


def test_eval_reports_its_dtype(trained, hamlet_data):
    results = {}
    for dtype in ("fp32", "int8", "int8-dynamic"):
        out = run_cli("eval", str(trained), "--task", "val", "--data-dir", str(hamlet_data), "--json", "--dtype", dtype)
        assert out.returncode == 0, out.stderr[-2000:]
        results[dtype] = json.loads(out.stdout)
        assert results[dtype]["dtype"] == dtype
    assert results["int8"]["loss"] == pytest.approx(results["fp32"]["loss"], rel=0.02)
    assert results["int8-dynamic"]["loss"] == pytest.approx(results["fp32"]["loss"], rel=0.02)
    # no --task, no --data-dir: val on the data the model was trained on
    default = run_cli("eval", str(trained), "--json", "--dtype", "fp32")
    assert default.returncode == 0, default.stderr[-2000:]
    assert json.loads(default.stdout) == results["fp32"]


# (the compiled servers compile four passes each: about 2 minutes apiece on 2 cores, hence `slow`)
SERVERS = [
    pytest.param("int8", False, id="eager"),
    pytest.param("int8", True, id="compile", marks=pytest.mark.slow),
    pytest.param("int8-dynamic", True, id="dynamic-compile", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("dtype", "compiled"), SERVERS)
def test_serve_with_int8_weights(trained_block, dtype, compiled):
    import urllib.request

    from gpt2scratch.testing import ServerProcess

    loaded = loading.load(str(trained_block), dtype=dtype)
    expected = loaded.tokenizer.decode(
        generate_ids(loaded.model, [loaded.tokenizer.encode("To be")], 8, temperature=0)[0]
    )
    options = ("--dtype", dtype, "--compile") if compiled else ("--dtype", dtype)
    with ServerProcess(trained_block, *options, start_timeout=600) as server:
        body = json.dumps({"prompt": "To be", "max_tokens": 8, "temperature": 0, "n": 2}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.load(response)
        assert answer["usage"]["completion_tokens"] == 16
        assert [choice["text"] for choice in answer["choices"]] == [expected, expected]
    assert f"cpu, {dtype})" in server.output()  # the startup line names the dtype
    assert ("compiled in" in server.output()) == compiled  # --compile compiles before the server listens


def step_logits(model, step, sequence: list[int], prompt_length: int) -> torch.Tensor:
    """The next-token logits of each decoding step along `sequence`: its prompt at once, then one token at a time."""
    ids = torch.tensor([sequence])
    caches = model.new_kv_caches()
    with torch.no_grad():
        logits, _ = step(ids[:, :prompt_length], caches=caches, last_only=True)
        rows = [logits[0, -1]]
        for t in range(prompt_length, len(sequence) - 1):
            logits, _ = step(ids[:, t : t + 1], caches=caches, last_only=True)
            rows.append(logits[0, -1])
    return torch.stack(rows)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "int8", "int8-dynamic"])
def test_compiled_decoding_follows_eager(trained_block, dtype):
    """--compile (inductor's C++ GEMM templates on frozen weights) computes the eager model's logits, step by step
    along one sequence, and decodes its greedy tokens, alone and in batches of prompts (graphs of their own, which
    bf16 and int8 on a CPU with avx512_bf16 but no AMX compile untuned); int8 and int8-dynamic also for a second
    model of the same shapes."""
    eager = loading.load(str(trained_block), dtype=dtype)
    compiled = compile_decoding(loading.load(str(trained_block), dtype=dtype).model)
    prompt = eager.tokenizer.encode("To be, or not to be, that is the question")
    new = generate_ids(eager.model, [prompt], 24, temperature=0)[0]
    expected = step_logits(eager.model, eager.model, prompt + new, len(prompt))
    got = step_logits(compiled, decoding_step(compiled), prompt + new, len(prompt))
    assert not compiled.compiled_decoding.failed
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{dtype}: largest logit difference, compiled vs eager: {error:.2e} of the largest logit")
    assert error < 1e-2
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert generate_ids(compiled, [prompt], 24, temperature=0)[0] == new
    # batches (padded, and not) are graphs of their own
    prompts = [prompt, eager.tokenizer.encode("Hamlet:")]
    expected_rows = generate_ids(eager.model, prompts, 12, temperature=0)
    assert generate_ids(compiled, prompts, 12, temperature=0) == expected_rows
    assert generate_ids(compiled, prompts[:1] * 2, 12, temperature=0) == [new[:12]] * 2
    if dtype == "bf16":
        return
    # A second model of the same shapes, other weights, compiled in the same process: its own weights are used
    # (inductor freezes weights into compiled graphs, which its graph cache would otherwise hand to the second).
    other = loading.load(str(trained_block), dtype="fp32").model
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.9)
    apply_dtype(other, dtype)
    expected_other = step_logits(other, other, prompt + new, len(prompt))
    got_other = step_logits(other, decoding_step(compile_decoding(other)), prompt + new, len(prompt))
    assert ((got_other - expected_other).abs().max() / expected_other.abs().max()).item() < 1e-2
    assert torch.equal(step_logits(compiled, decoding_step(compiled), prompt + new, len(prompt)), got)


def test_compile_failure_decodes_eagerly(trained_block, capsys):
    """Where inductor cannot compile (here: no C++ compiler), --compile says so once and decodes as without it."""
    eager = loading.load(str(trained_block), dtype="int8")
    model = compile_decoding(loading.load(str(trained_block), dtype="int8").model)
    broken = {"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}  # (a cached build would not fail)
    model.compiled_decoding.inductor = {**model.compiled_decoding.inductor, **broken}
    prompt = [eager.tokenizer.encode("To be")]
    assert generate_ids(model, prompt, 8, temperature=0) == generate_ids(eager.model, prompt, 8, temperature=0)
    assert model.compiled_decoding.failed
    assert capsys.readouterr().err.count("compiling the decoding step failed") == 1
