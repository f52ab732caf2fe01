"""EleutherAI's lm-evaluation-harness (`lm_eval`, from PyPI) on our models, offline, as an evaluator runs it:
`--model local-completions` against `gpt2scratch serve` (the remote tokenizer: /tokenizer_info, /tokenize) and
`--model hf` on the export. A multiple-choice task from a local JSONL file gives per-choice log-likelihoods that
equal each other and our own scorer's (what `gpt2scratch eval` computes) within 1e-4 nats, with the same chosen
endings; a generate_until task through the server gives the greedy text of `gpt2scratch generate --temperature 0`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_model
from gpt2scratch import evaluation, loading
from gpt2scratch.testing import ServerProcess, run_cli

pytestmark = pytest.mark.slow

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "seven."], "label": 0},
    {"ctx": "She opened the door and", "endings": ["walked in.", "sang.", "the sky fell.", "ran away quickly."],
     "label": 0},
]  # fmt: skip

TASKS = """
task: g2s_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
---
task: g2s_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{endings[0]}}}}"
generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: 12, do_sample: false, temperature: 0}}
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    (root / "data.jsonl").write_text("".join(json.dumps(example) + "\n" for example in EXAMPLES))
    tasks = root / "tasks"
    tasks.mkdir()
    for i, text in enumerate(TASKS.format(data=root / "data.jsonl").split("---")):
        (tasks / f"task_{i}.yaml").write_text(text.strip() + "\n")
    model = write_model(root / "model", context_length=128, emb_dim=48)
    assert run_cli("export", str(model), "--out", str(root / "hf")).returncode == 0
    return root, model


def lm_eval(root: Path, *args: str, tasks: str, output: str) -> list[dict]:
    """Run the lm_eval command; returns its logged samples."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(Path(sys.executable).parent / "lm_eval"), *args, "--tasks", tasks, "--include_path",
               str(root / "tasks"), "--log_samples", "--output_path", str(root / output)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    (samples,) = (root / output).rglob(f"samples_{tasks}_*.jsonl")
    return sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])


def lm_eval_served(root: Path, model: Path, tasks: str, output: str) -> list[dict]:
    """lm_eval's local-completions against `gpt2scratch serve MODEL` (remote tokenizer); returns its samples."""
    with ServerProcess(model, "--model-name", "tiny", "--dtype", "fp32") as server:
        base_url = f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=remote,num_concurrent=1"
        return lm_eval(root, "--model", "local-completions", "--model_args", base_url, tasks=tasks, output=output)


def loglikelihoods(samples: list[dict]) -> list[list[float]]:
    return [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]


def test_multiple_choice_through_the_server_and_the_export_equals_our_scorer(setup):
    root, model = setup
    served = lm_eval_served(root, model, tasks="g2s_choice", output="served")
    exported = lm_eval(root, "--model", "hf", "--model_args", f"pretrained={root / 'hf'},dtype=float32", "--device",
                       "cpu", "--batch_size", "2", tasks="g2s_choice", output="exported")  # fmt: skip
    loaded = loading.load(str(model))
    pairs = [(loaded.tokenizer.encode(e["ctx"]), loaded.tokenizer.encode(" " + ending)) for e in EXAMPLES
             for ending in e["endings"]]  # fmt: skip
    ours = [-score.loss_sum for score in evaluation.score_continuations(loaded.model, pairs)]
    ours = [ours[4 * i : 4 * i + 4] for i in range(len(EXAMPLES))]
    for a, b, c in zip(loglikelihoods(served), loglikelihoods(exported), ours, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
        assert max(abs(x - y) for x, y in zip(a, c, strict=True)) < 1e-4, (a, c)
        assert a.index(max(a)) == b.index(max(b)) == c.index(max(c))  # the same ending is chosen
    assert [s["acc"] for s in served] == [s["acc"] for s in exported]


def test_generate_until_through_the_server_is_our_greedy_text(setup):
    root, model = setup
    samples = lm_eval_served(root, model, tasks="g2s_generate", output="generated")
    for example, sample in zip(EXAMPLES, samples, strict=True):
        ctx = example["ctx"]
        result = run_cli("generate", str(model), "--prompt", ctx, "--temperature", "0", "--max-new-tokens", "12",
                         "--stop", "\n\n", "--dtype", "fp32")  # fmt: skip
        assert result.returncode == 0, result.stderr
        greedy = result.stdout[len(ctx) :].removesuffix("\n")  # generate prints the prompt, the text, a newline
        assert sample["filtered_resps"][0] == greedy, (sample["filtered_resps"], greedy)
