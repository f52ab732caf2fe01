"""Evaluation against an independent implementation with transformers on the exported model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2scratch import evaluation
from gpt2scratch.config import GPTConfig
from gpt2scratch.dataset.data_module import prepare
from gpt2scratch.dataset.dataset import TokenSplit
from gpt2scratch.dataset.shards import read_manifest
from gpt2scratch.dataset.tokenizer import GPT2_DIR, Tokenizer
from gpt2scratch.hf import export_folder
from gpt2scratch.models import GPT
from gpt2scratch.options import PrepareOptions
from gpt2scratch.testing import run_cli, torchrun

HELLASWAG = [
    {"ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady", "label": 3,
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."]},
    {"ctx": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, with",
     "label": 2, "endings": ["a man also dances with the women.", "the women are swimming.",
                             "the man stands and waits.", "people ride them in a boat."]},
    {"ctx": "The boy lifts his body above the height of a pole. The boy", "label": 1,
     "endings": ["holds on to a rope.", "lands on his back on to a red mat.", "turns his body around on the mat.",
                 "stands up and waves."]},
    {"ctx": "Cooking: the chef", "label": 0,
     "endings": ["cuts the onions.", "flies.", "sings loudly to the pan now.", "x"]},
]  # fmt: skip
LAMBADA = [
    "In my palm is a clear stone, and inside it is a small ivory statuette. I don't care about signs",
    "Give me a minute to change and I'll meet you at the docks. She gripped her arm. Shane",
    "The dog barked at the mailman every single morning without fail, and the mailman hated the dog",
    "He poured the coffee, added milk, and stirred it slowly with a spoon",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG))
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA))
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
    model = GPT(config).eval()
    folder = tmp_path_factory.mktemp("hf")
    export_folder(model.state_dict(), config, GPT2_DIR, folder)
    return model, folder


def transformers_continuation_losses(folder, context: str, continuation: str) -> tuple[float, int, bool]:
    """Independent: transformers' model and tokenizer; the loss of the continuation tokens, summed."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(ids).logits[0, len(ctx) - 1 : -1]
    target = torch.tensor(cont)
    return F.cross_entropy(logits, target, reduction="sum").item(), len(cont), bool((logits.argmax(-1) == target).all())


def test_hellaswag_equals_an_independent_scoring_with_transformers(exported, files):
    model, folder = exported
    ours = evaluation.evaluate_hellaswag(
        model, Tokenizer.gpt2(), evaluation.hellaswag_examples(files / "hellaswag.jsonl")
    )
    correct = correct_norm = correct_chars = 0
    for record in HELLASWAG:
        scores = [transformers_continuation_losses(folder, record["ctx"], " " + e) for e in record["endings"]]
        correct += min(range(4), key=lambda j: scores[j][0]) == record["label"]
        correct_norm += min(range(4), key=lambda j: scores[j][0] / scores[j][1]) == record["label"]
        correct_chars += min(range(4), key=lambda j: scores[j][0] / len(record["endings"][j])) == record["label"]
    expected = {"acc": correct / 5, "acc_norm": correct_norm / 5, "acc_norm_chars": correct_chars / 5}
    assert ours == {"task": "hellaswag", **expected, "examples": 5}


def test_lambada_equals_an_independent_scoring_with_transformers(exported, files):
    model, folder = exported
    ours = evaluation.evaluate_lambada(model, Tokenizer.gpt2(), evaluation.lambada_examples(files / "lambada.jsonl"))
    scores = []
    for text in LAMBADA:
        cut = text.rfind(" ")
        scores.append(transformers_continuation_losses(folder, text[:cut], text[cut:]))
    assert ours["acc"] == sum(s[2] for s in scores) / 4
    assert ours["ppl"] == pytest.approx(math.exp(sum(s[0] for s in scores) / 4), rel=1e-5)
    assert ours["examples"] == 4


def test_batching_and_cropping_do_not_change_scores(exported):
    model, _ = exported
    pairs = [([5, 6, 7] * (i + 1), [8, 9]) for i in range(30)]  # up to 92 tokens: cropped to the context of 64
    one = evaluation.score_continuations(model, pairs, batch_size=1)
    many = evaluation.score_continuations(model, pairs, batch_size=7)
    assert [s.greedy for s in one] == [s.greedy for s in many]
    assert [s.loss_sum for s in one] == pytest.approx([s.loss_sum for s in many], rel=1e-5)


def test_val_bits_per_byte_follow_the_manifest(tmp_path):
    (tmp_path / "t.txt").write_text("All the world's a stage, and all the men and women merely players. " * 60)
    prepare([str(tmp_path / "t.txt")], tmp_path / "d", PrepareOptions(workers=1, progress=False))
    model = GPT(GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)).eval()
    split = TokenSplit(tmp_path / "d", "val")
    result = evaluation.evaluate_val(model, split, batch_size=4)
    val = read_manifest(tmp_path / "d")["splits"]["val"]
    assert result["bpb"] == pytest.approx(result["loss"] * val["tokens"] / (val["bytes"] * math.log(2)))
    assert result["tokens"] == (val["tokens"] - 1) // 32 * 32


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("", "holds no examples"),
        ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 0}\n{oops\n', ":2 is not valid JSON"),
        ('{"ctx": "a", "label": 0}\n', ":1 has no endings field"),
    ],
)
def test_bad_hellaswag_files_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "h.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(evaluation.EvalDataError, match=message):
        evaluation.hellaswag_examples(path)


def test_cli_eval_json_and_one_line_errors(exported, files):
    _, folder = exported
    run = lambda *a: run_cli("eval", str(folder), *a)  # noqa: E731
    result = run("--task", "hellaswag", "--data", str(files / "hellaswag.jsonl"), "--json", "--limit", "3")
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed["task"] == "hellaswag" and parsed["examples"] == 3 and 0 <= parsed["acc_norm"] <= 1
    bad = run("--task", "lambada", "--data", str(files / "missing.jsonl"))
    assert bad.returncode == 1 and bad.stderr.strip().endswith("missing.jsonl does not exist")
    assert "Traceback" not in bad.stderr


def test_training_logs_hellaswag_beside_val_loss(tmp_path, files):
    (tmp_path / "t.txt").write_text("A man is sitting on a roof. He starts pulling up roofing on a roof. " * 80)
    prepare([str(tmp_path / "t.txt")], tmp_path / "d", PrepareOptions(tokenizer="bpe:300", workers=1, progress=False))
    args = ["--preset", "tiny", "--max-steps", "4", "--eval-every", "2", "--eval-hellaswag-every", "2"]
    args += ["--hellaswag-file", str(files / "hellaswag.jsonl"), "--hellaswag-limit", "4", "--tokens-per-step", "0"]
    args += [
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--data-dir",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "r"),
    ]
    result = run_cli("train", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["hellaswag_acc_norm"] <= 1 and "hellaswag_acc" in r for r in evals)


@pytest.mark.distributed
def test_torchrun_eval_equals_one_process(exported, files):
    """Two ranks split the examples and all-reduce the sums: the figures equal a single process's."""
    _, folder = exported
    args = ["eval", str(folder), "--task", "hellaswag", "lambada", "--json", "--device", "cpu"]
    args += ["--hellaswag-file", str(files / "hellaswag.jsonl"), "--lambada-file", str(files / "lambada.jsonl")]
    one = run_cli(*args)
    two = torchrun(*args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]
    assert [r["acc"] for r in a] == [r["acc"] for r in b] and a[0]["acc_norm"] == b[0]["acc_norm"]
    assert a[1]["ppl"] == pytest.approx(b[1]["ppl"], rel=1e-6) and a[1]["examples"] == b[1]["examples"] == 4


def test_continuation_scores_equal_a_float64_scoring_of_the_same_logits():
    """The scorer is as precise as the model: each token's loss within 1e-5 nats of log-softmax in float64 over
    the same logits (at GPT-2's vocabulary and realistic logit scales, a (B, V, T) cross-entropy misses this)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits with a standard deviation of about 2, as a trained model's
    sequences = torch.randint(0, 50257, (4, 64))
    pairs = [(seq[:t].tolist(), [seq[t].item()]) for seq in sequences for t in range(1, 64)]  # one token each
    scores = evaluation.score_continuations(model, pairs, batch_size=32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(sequences)[0].double(), dim=-1)  # (4, 64, V) in float64
    reference = [-logprobs[i, t - 1, sequences[i, t]].item() for i in range(4) for t in range(1, 64)]
    errors = [abs(score.loss_sum - ref) for score, ref in zip(scores, reference, strict=True)]
    assert max(errors) <= 1e-5, max(errors)
