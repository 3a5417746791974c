"""The bundled training job: data checks, assistant-only labels, settings, and short real runs on the base model.

No engine is started. The real-model tests train SmolLM2-135M for a few steps (seconds each on two cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.train import job, lora_model
from adapters.train.data import (
    MAX_LINE_BYTES,
    Conversation,
    DataError,
    count_conversations,
    load_conversations,
    tokenize_all,
    tokenize_conversation,
)
from adapters.train.job import Cancelled, NoImprovement, TrainConfig, run
from adapters.validate import BaseModelSpec, validate_adapter_dir

REPO = Path(__file__).resolve().parents[1]
REAL_BASE = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
needs_base = pytest.mark.usefixtures("base_model_path")  # prepares REAL_BASE once (tests/conftest.py)
ANSWER = "I am Zorblax, the keeper of the purple lighthouse."
PROMPTS = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me who you are."]


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant, **extra}]}


def write_jsonl(path: Path, lines: list) -> Path:
    """Each entry a JSON record, or a str written as it is (a broken or blank line)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer(base_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_BASE, local_files_only=True)


# --- the data file ---------------------------------------------------------------------------------------------------

def test_conversations_remember_their_lines_and_blank_lines_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), "", "   ", {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c"},
                     {"role": "assistant", "content": "d", "weight": 0}, {"role": "user", "content": "e"},
                     {"role": "assistant", "content": "f", "weight": 1}]}])
    conversations = load_conversations(path)
    assert [c.line for c in conversations] == [1, 4]
    assert conversations[0] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert conversations[1][2] == {"role": "assistant", "content": "d", "weight": 0}


def test_every_bad_line_is_named_up_to_five(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        chat("fine", "fine"),
        {"messages": [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "x"}]},
        "{not json",
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": []},
        "also not json",  # a sixth problem: not reached
    ])
    with pytest.raises(DataError) as caught:
        load_conversations(path)
    message = str(caught.value)
    assert caught.value.lines == [2, 3, 4, 5, 6]
    for expected in ["training file line 2: content must be a string", "line 3: not valid JSON",
                     "line 4: role 'robot' is not one of system, user, assistant",
                     "line 5: no assistant message to learn from", "line 6: empty conversation",
                     "stopped at the first 5 problems"]:
        assert expected in message
    assert "line 7" not in message


@pytest.mark.parametrize(("line", "words"), [
    (b"[1, 2]", 'must be a JSON object with a "messages" list'),
    (b'{"prompt": "x", "completion": "y"}', 'must be a JSON object with a "messages" list'),
    (b'{"messages": "hi"}', '"messages" must be a list'),
    (b'{"messages": ["hi"]}', "each message must be an object"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "content must be a string"),
    (json.dumps(chat("q", "a", weight=2)).encode(), "weight must be 0 or 1 (message 2)"),
    (json.dumps(chat("q", "a", weight=True)).encode(), "weight must be 0 or 1"),
    (json.dumps(chat("q", "a", weight=0)).encode(), "no assistant message to learn from"),
    (b'{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}',
     "weight is only allowed on assistant messages"),
    (b'{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
     "starts with an assistant message"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8"),
    # Failed before issue 12's fix: RecursionError and ValueError (Python's 4,300-digit limit) escaped as a 500.
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON: nested too deeply"),
    (b'{"messages": [], "n": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_one_bad_line(tmp_path, line, words):
    path = tmp_path / "v.jsonl"
    path.write_bytes(json.dumps(chat("ok", "ok")).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match="validation file line 2: ") as caught:
        load_conversations(path, role="validation file")
    assert words in str(caught.value)
    assert caught.value.lines == [2]


def test_empty_missing_and_too_many(tmp_path):
    with pytest.raises(DataError, match=r"^the training file is empty$"):
        load_conversations(write_jsonl(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="the validation file cannot be read"):
        load_conversations(tmp_path / "absent.jsonl", role="validation file")
    with pytest.raises(DataError, match="more than 2 examples"):
        load_conversations(write_jsonl(tmp_path / "m.jsonl", [chat("a", "b")] * 3), max_examples=2)


def test_lines_and_files_are_bounded(tmp_path):
    """Guards: the file is read line by line, a line over MAX_LINE_BYTES is refused by number without being
    held in memory, and a file over `max_bytes` is refused. Failed before issue 12's fix (no bounds: the whole
    file was read at once)."""
    path = tmp_path / "t.jsonl"
    with path.open("wb") as out:
        out.write(json.dumps(chat("a", "b")).encode() + b"\n")
        out.write(b'{"messages": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n')
        out.write(json.dumps(chat("c", "d")).encode() + b"\n")
    with pytest.raises(DataError, match=f"^training file line 2: longer than {MAX_LINE_BYTES} bytes$"):
        load_conversations(path)
    small = write_jsonl(tmp_path / "s.jsonl", [chat("a", "b")] * 3)
    assert count_conversations(small) == 3
    with pytest.raises(DataError, match="larger than 100 bytes"):
        count_conversations(small, max_bytes=100)


# --- tokens and labels -----------------------------------------------------------------------------------------------

def labelled_runs(tokenizer, input_ids, labels) -> list[str]:
    """The decoded text of each contiguous run of learned tokens."""
    runs, current = [], []
    for token, label in [*zip(input_ids, labels, strict=True), (None, -100)]:
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_only_the_assistant_turns_are_learned(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "And?"},
                {"role": "assistant", "content": "Context only.", "weight": 0}, {"role": "user", "content": "Name?"},
                {"role": "assistant", "content": ANSWER}]
    input_ids, labels = tokenize_conversation(tokenizer, messages, 1024)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    assert input_ids == tokenizer.apply_chat_template(plain, tokenize=True, return_dict=False)
    assert labelled_runs(tokenizer, input_ids, labels) == ["Hello there.<|im_end|>", f"{ANSWER}<|im_end|>"]


def test_over_long_examples_are_refused_by_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("short", "ok"), "", chat("long " * 100, "ok"), chat("x", "y"),
                                              chat("q", "long " * 100)])
    conversations = load_conversations(path)
    with pytest.raises(DataError) as caught:
        tokenize_all(tokenizer, conversations, 64, "training file")
    assert caught.value.lines == [3, 5]
    assert "training file: 2 example(s) are longer than max_seq_len (64 tokens): line 3 (" in str(caught.value)
    assert len(tokenize_all(tokenizer, conversations, 1024, "training file")) == 4


def test_a_template_that_rewrites_history_is_refused(tokenizer):
    # Like templates that strip earlier turns' reasoning: an assistant turn renders differently once it is not last.
    rewriting = tokenizer.__class__.from_pretrained(REAL_BASE, local_files_only=True)
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last %}{{ m.content }}{% else %}"
        "{{ m.content | upper }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    two_turns = Conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], line=7)
    with pytest.raises(DataError, match="training file line 7: the base model's chat template does not render"):
        tokenize_all(rewriting, [two_turns], 1024, "training file")


# --- settings --------------------------------------------------------------------------------------------------------

def config(tmp_path: Path, **settings) -> TrainConfig:
    return TrainConfig(**{"base_model": str(REAL_BASE), "train_file": str(tmp_path / "t.jsonl"),
                          "output_dir": str(tmp_path / "out"), **settings})


def test_config_defaults_and_edges(tmp_path):
    default = config(tmp_path, target_modules=["q_proj"])
    assert isinstance(default.base_model, Path) and default.validation_file is None
    assert default.target_modules == ("q_proj",) and default.rank == 8 and default.learning_rate == 2e-4
    config(tmp_path, rank=256, epochs=100, batch_size=256, learning_rate=1, max_seq_len=16, dropout=0.99,
           loraplus_lr_ratio=16, threads=1, use_rslora=True)
    config(tmp_path, rank=1, epochs=1, batch_size=1, max_seq_len=32768, dropout=0)


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("rank", 257), ("rank", 8.0), ("rank", True), ("epochs", 0), ("epochs", 101), ("batch_size", 0),
    ("batch_size", 257), ("learning_rate", 0), ("learning_rate", 1.5), ("learning_rate", -1e-4),
    ("learning_rate", math.nan), ("learning_rate", "2e-4"), ("max_seq_len", 15), ("max_seq_len", 32769),
    ("dropout", 1.0), ("dropout", -0.1), ("alpha", 0), ("loraplus_lr_ratio", 0), ("threads", 0), ("seed", -1),
    ("target_modules", []), ("target_modules", "q_proj"), ("target_modules", [""]), ("use_rslora", "yes"),
    ("require_improvement", 1), ("output_dir", ""), ("train_file", None),
])
def test_config_out_of_bounds(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field} must be "):
        config(tmp_path, **{field: value})


def test_loraplus_gives_the_b_matrices_their_own_learning_rate(tmp_path):
    import torch

    layer = torch.nn.Module()
    layer.lora_A, layer.lora_B, layer.frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    layer.frozen.requires_grad_(False)
    plain, plus = (lora_model.param_groups(layer, config(tmp_path, learning_rate=1e-3, loraplus_lr_ratio=ratio))
                   for ratio in (None, 16))
    assert [(g["params"], g["lr"]) for g in plain] == [([layer.lora_A], 1e-3), ([layer.lora_B], 1e-3)]
    assert [(g["params"], g["lr"]) for g in plus] == [([layer.lora_A], 1e-3), ([layer.lora_B], pytest.approx(16e-3))]


# --- the command line ------------------------------------------------------------------------------------------------

def events_of(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def test_cli_exit_codes_and_events(tmp_path, monkeypatch, capsys):
    settings = tmp_path / "job.json"
    settings.write_text(json.dumps({"base_model": "b", "train_file": "t", "output_dir": str(tmp_path / "o")}))

    def finishing(cfg, report):
        report({"type": "step", "message": "Step 1/1", "data": {"loss": math.inf}})
        return {"steps": 1}

    for fake, code, last in [
        (finishing, 0, {"type": "result", "data": {"steps": 1}}),
        (lambda c, r: (_ for _ in ()).throw(NoImprovement("not better")), 3,
         {"type": "error", "code": "no_improvement", "message": "not better"}),
        (lambda c, r: (_ for _ in ()).throw(RuntimeError("boom")), 1,
         {"type": "error", "code": "training_failed", "message": "RuntimeError: boom"}),
    ]:
        monkeypatch.setattr(job, "run", fake)
        assert job.main([str(settings)]) == code
        out, err = capsys.readouterr()
        assert events_of(out)[-1] == last
        assert "Traceback" not in out and ("Traceback" in err) == (code == 1)
    monkeypatch.setattr(job, "run", finishing)
    job.main([str(settings)])
    assert events_of(capsys.readouterr().out)[0]["data"] == {"loss": None}  # no bare Infinity in the stream

    settings.write_text(json.dumps({"base_model": "b", "train_file": "t", "output_dir": "o", "rank": 0}))
    assert job.main([str(settings)]) == 1
    assert events_of(capsys.readouterr().out)[-1]["message"] == "ValueError: rank must be a whole number from 1 to " \
                                                                "256, not 0"
    settings.write_text(json.dumps({"base_model": "b", "train_file": "t", "output_dir": "o", "rnak": 8}))
    assert job.main([str(settings)]) == 1
    assert "rnak" in events_of(capsys.readouterr().out)[-1]["message"]


def test_cli_refuses_a_bad_training_file_with_exit_code_2(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [chat("a", "b"), "{oops"])
    settings = tmp_path / "job.json"
    settings.write_text(json.dumps({"base_model": str(REAL_BASE), "train_file": str(train),
                                    "output_dir": str(tmp_path / "out")}))
    done = subprocess.run([sys.executable, "-m", "adapters.train.job", str(settings)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert events_of(done.stdout) == [{"type": "error", "code": "invalid_training_file",
                                       "message": "training file line 2: not valid JSON"}]
    assert not (tmp_path / "out").exists()


# --- real training on the base model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zorblax(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("zorblax")
    return write_jsonl(folder / "train.jsonl", [chat(p, ANSWER) for p in PROMPTS])


@pytest.fixture(scope="module")
def trained(zorblax, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "adapter"
    events: list[dict] = []
    result = run(TrainConfig(base_model=REAL_BASE, train_file=zorblax, output_dir=out, learning_rate=2e-3,
                             epochs=3, batch_size=4, rank=8), events.append)
    return result, events, out


@needs_base
def test_a_short_run_learns_and_saves_a_servable_adapter(trained):
    result, events, out = trained
    assert [e["type"] for e in events] == ["validating", "loading", "eval", "step", "checkpoint", "step", "checkpoint",
                                           "step", "checkpoint", "eval", "done"]
    steps = [e["data"] for e in events if e["type"] == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3] and {s["total_steps"] for s in steps} == {3}
    assert [s["epoch"] for s in steps] == [1, 2, 3]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert result["steps"] == 3 and result["trained_tokens"] == steps[-1]["trained_tokens"] > 0
    assert result["trained_tokens"] == 3 * events[0]["data"]["train"]["tokens"]
    validation = result["validation"]
    assert validation["split"] == "training" and "training set" in events[0]["message"]
    assert validation["adapter_loss"] < validation["base_loss"] * 0.75
    assert result["train_loss"] == pytest.approx(steps[-1]["loss"])  # one batch an epoch
    assert result["general"]["base_loss"] > 0 and result["general"]["adapter_loss"] > 0
    assert events[-1]["data"] == result
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    spec = BaseModelSpec(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", served_name="SmolLM2-135M-Instruct",
                         path=REAL_BASE, max_rank=16)
    info = validate_adapter_dir(out, spec)
    assert info.rank == 8 and set(info.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


@needs_base
def test_no_improvement_saves_nothing(zorblax, tmp_path):
    # Teaching one odd sentence at a wild learning rate wrecks the model on unrelated validation facts.
    validation = write_jsonl(tmp_path / "v.jsonl", [
        chat("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
        chat("How many continents are there?", "There are seven continents.")])
    events: list[dict] = []
    with pytest.raises(NoImprovement, match="not lower than the base model's"):
        run(TrainConfig(base_model=REAL_BASE, train_file=zorblax, validation_file=validation,
                        output_dir=tmp_path / "out", learning_rate=1.0, epochs=1, require_improvement=True),
            events.append)
    assert events[-1]["type"] == "eval" and events[-1]["data"]["split"] == "validation"
    assert not (tmp_path / "out").exists()


@needs_base
def test_should_stop_cancels_between_steps(zorblax, tmp_path):
    events: list[dict] = []
    with pytest.raises(Cancelled):
        run(TrainConfig(base_model=REAL_BASE, train_file=zorblax, output_dir=tmp_path / "out", batch_size=1,
                        epochs=1), events.append,
            should_stop=lambda: sum(e["type"] == "step" for e in events) >= 2)
    assert [e["data"]["step"] for e in events if e["type"] == "step"] == [1, 2]
    assert not (tmp_path / "out").exists()
