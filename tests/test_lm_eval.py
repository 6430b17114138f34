"""scripts/evaluate.py --tasks on a local multiple-choice task: lm-evaluation-harness scores the tiny run's
Hugging Face export, and its accuracy is the one counted by hand with our own model and tokenizer, each
choice's log-likelihood computed as lm-eval computes it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_cli
from data.tokenizer import gpt2_tokenizer
from models.hf_export import load_model

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

TASK = "muonlab_tiny_choice"
# Choices of a few tokens and of many (a smaller summed log-probability), the right one short or long, so that
# the tiny model's picks vary from question to question (the tiny run scores 1/8).
QUESTIONS = [
    ("Who loves Juliet?", ["Romeo", "the Prince of Verona and all his men", "Tybalt", "a friar"], 0),
    ("What breaks through yonder window?", ["the sun", "light, soft and fair, from the east", "a king", "night"], 1),
    ("Who is the Prince of Denmark?", ["Hamlet", "Lear", "Macbeth", "the ghost of his murdered father"], 0),
    ("What does the king cry for at Bosworth?", ["a sword", "a horse, my kingdom for a horse", "a crown", "peace"], 1),
    ("Where do the witches meet Macbeth?", ["Rome", "upon the heath, in thunder and in rain", "Venice", "Athens"], 1),
    ("What is in a name?", ["a rose by any other name would smell as sweet", "lord", "nothing", "all"], 0),
    ("Who is the Moor of Venice?", ["Iago", "Othello", "Cassio", "the duke and senators of the city"], 1),
    ("What is the rest, says Hamlet?", ["silence", "sleep", "a long and weary journey into night", "death"], 2),
]


def task_dir(tmp_path):
    """A folder with the task's JSON-lines questions and its YAML (lm-eval's own keys)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    docs = folder / "questions.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    config = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",  # a field name: the document's list itself
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],  # target_delimiter: lm-eval's default " "
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval.api.model.TemplateLM._encode_pair for a causal model: the context's trailing whitespace goes
    to the continuation, the whole text is encoded, and the continuation is what follows the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


def loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0]
    targets = ids[0, len(context_ids):]
    return float(logprobs[len(context_ids) - 1:].gather(-1, targets[:, None]).sum())


@pytest.fixture
def run(trained_run):
    return trained_run


def test_lm_eval_accuracy_on_a_local_task_is_the_hand_count(run, tmp_path):
    env = {"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets")}  # the json builder's cache: not the user's
    result = run_cli("scripts/evaluate.py", str(run), "--tasks", TASK, "--include", str(task_dir(tmp_path)), env=env,
                     timeout=600)
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval" / "lm_eval.json").read_text())
    scores = written["results"][TASK]
    acc = scores["acc,none"] if "acc,none" in scores else scores["acc"]
    assert written["n-samples"][TASK]["effective"] == len(QUESTIONS)

    config, model = load_model(run)
    encode = gpt2_tokenizer().encode_ordinary
    predictions, margins = [], []
    for question, choices, _ in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        lls = [loglikelihood(model, *encode_pair(encode, context, " " + choice)) for choice in choices]
        best, second = sorted(lls, reverse=True)[:2]
        predictions.append(max(range(len(choices)), key=lls.__getitem__))
        margins.append(best - second)
    assert min(margins) > 1e-3, margins  # no near tie that the export's float rounding could turn
    correct = sum(p == a for p, (_, _, a) in zip(predictions, QUESTIONS))
    assert len(set(predictions)) > 1, predictions  # not one choice index for every question
    assert acc == correct / len(QUESTIONS), (acc, predictions)
    assert f"{TASK}: acc" in result.stdout


def test_an_unknown_task_is_a_one_line_error(run):
    result = run_cli("scripts/evaluate.py", str(run), "--tasks", "nope", timeout=600)
    assert result.returncode == 2 and "unknown lm-eval task(s) ['nope']" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
