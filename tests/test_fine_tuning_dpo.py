"""DPO through OpenAI's fine-tuning API (`method={"type": "dpo", ...}`, OpenAI's preference format), end to end: the
official `openai` client, a real worker training with the bundled loop, and the real engine serving the result."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.test_fine_tuning import TRAIN, ask, jsonl, upload, wait_for, worker  # noqa: F401

# The preferred answers are ones the base model finds unlikely (a pirate's), the others its own plain style: before
# training it prefers the non-preferred answer of every pair by a wide log-probability margin.
QUESTIONS = {"What is the capital of France?": "Paris", "Name a primary colour.": "Red",
             "What do bees make?": "Honey", "How many legs has a cat?": "Four",
             "What season comes after winter?": "Spring", "What is frozen water called?": "Ice"}
PLAIN = {"What is the capital of France?": "The capital of France is Paris.",
         "Name a primary colour.": "Red is a primary colour.", "What do bees make?": "Bees make honey.",
         "How many legs has a cat?": "A cat has four legs.",
         "What season comes after winter?": "Spring comes after winter.",
         "What is frozen water called?": "Frozen water is called ice."}


def pirate(answer: str) -> str:
    return f"Ahoy! {answer}, matey, arr!"


def pair(question: str, preferred: str, rejected: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


PAIRS = jsonl(pair(q, pirate(a), PLAIN[q]) for q, a in QUESTIONS.items())
DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 5, "batch_size": 4}}}


def answer_logprob(gateway, client, model: str, question: str, answer: str) -> float:
    """The served model's summed log-probability of `answer` to `question`, from the engine's prompt logprobs
    (a completion that echoes the whole chat-rendered conversation)."""
    tokenizer = AutoTokenizer.from_pretrained(gateway.settings.model_path)
    asked = [{"role": "user", "content": question}]
    prefix = tokenizer.apply_chat_template(asked, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*asked, {"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(prefix)
    logprobs = client.completions.create(model=model, prompt=full, echo=True, logprobs=0, max_tokens=1,
                                         temperature=0).choices[0].logprobs
    return sum(lp for lp, offset in zip(logprobs.token_logprobs, logprobs.text_offset, strict=False)
               if lp is not None and len(prefix) <= offset < len(full))


def test_a_dpo_job_flips_the_models_preference_and_the_adapter_serves(gateway, worker):  # noqa: F811
    """The issue's test: on the pairs it was trained on, the preferred answer's log-probability margin over the
    non-preferred one goes from <= 0 (base model) to > 0 (the published adapter), measured by the job and, apart
    from it, on the real engine serving the adapter."""
    alpha = gateway.client(gateway.tenants["alpha"].key)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name,
                                        training_file=upload(alpha, PAIRS, "pairs.jsonl").id, suffix="pirate",
                                        method=DPO)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.method.dpo.hyperparameters.n_epochs == 5 and done.fine_tuned_model.startswith("pirate@")

    figures = done.model_extra["result"]["preferences"]
    assert figures["split"] == "training" and figures["before"]["pairs"] == len(QUESTIONS)
    assert figures["before"]["logprob_margin"] <= 0 < figures["after"]["logprob_margin"]
    assert figures["after"]["preference_accuracy"] > figures["before"]["preference_accuracy"]
    assert figures["after"]["reward_margin"] > 0 and figures["after"]["dpo_loss"] < figures["before"]["dpo_loss"]
    assert {"base_loss", "adapter_loss"} <= set(done.model_extra["result"]["general"])  # forgetting, measured
    events = alpha.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any("Files validated: 6 training preference pairs" in e.message for e in events)
    assert any(e.data and e.data.get("stage") == "after" and "preference_accuracy" in e.data for e in events)

    for question, answer in QUESTIONS.items():
        margins = {model: answer_logprob(gateway, alpha, model, question, pirate(answer))
                   - answer_logprob(gateway, alpha, model, question, PLAIN[question])
                   for model in (gateway.settings.served_model_name, "pirate")}
        assert margins[gateway.settings.served_model_name] <= 0 < margins["pirate"], (question, margins)
    assert ask(alpha, "pirate", "What do bees make?")  # and it answers a chat request
    [result] = done.result_files
    assert alpha.files.content(result).text.startswith("step,train_loss,train_accuracy")

    # Continued: DPO from the adapter, measured on a validation file. The reference is the starting version, which
    # already prefers the preferred answers: the "before" figures are that version's, not the base model's.
    held_out = upload(alpha, jsonl([pair("What is frozen water called?", pirate("Ice"), PLAIN["What is frozen water "
                                                                                         "called?"])]), "held.jsonl")
    more = alpha.fine_tuning.jobs.create(model="pirate", training_file=job.training_file, validation_file=held_out.id,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}})
    assert more.model == done.fine_tuned_model and more.method.dpo.hyperparameters.beta == 0.1  # "auto"
    again = wait_for(alpha, more.id, ("succeeded", "failed", "cancelled"))
    assert again.status == "succeeded", again.error
    continued = again.model_extra["result"]["preferences"]
    assert continued["split"] == "validation" and continued["before"]["logprob_margin"] > 0
    [checkpoint] = alpha.fine_tuning.jobs.checkpoints.list(more.id)
    figures = {k for k, v in checkpoint.metrics.model_dump().items() if v is not None}
    assert {"valid_loss", "valid_preference_accuracy", "valid_reward_margin"} <= figures


@pytest.mark.parametrize(("lines", "words"), [
    ([pair("Hi?", "Ahoy!", "Hello.") | {"non_preferred_output": None}, pair("Yo?", "Arr.", "Hey.")],
     'line 1: "non_preferred_output" must be a list of one assistant message'),
    ([pair("Hi?", "Ahoy!", "Hello."), {k: v for k, v in pair("Yo?", "Arr.", "Hey.").items()
                                       if k != "non_preferred_output"}], 'line 2: missing "non_preferred_output"'),
    ([pair("Hi?", "Same.", "Same.")], "line 1: the preferred and non-preferred outputs are the same"),
    ([{"input": {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]},
      "preferred_output": [{"role": "assistant", "content": "A"}],
      "non_preferred_output": [{"role": "assistant", "content": "B"}]}], "line 1: \"input.messages\" must end with"),
    (None, 'line 1: a chat line for supervised training ("messages")'),  # an SFT file given to DPO
])
def test_bad_preference_files_fail_naming_the_line(gateway, worker, lines, words):  # noqa: F811
    alpha = gateway.client(gateway.tenants["alpha"].key)
    content = TRAIN if lines is None else jsonl(lines)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name, method=DPO, suffix="broken-dpo",
                                        training_file=upload(alpha, content, "pairs.jsonl").id)
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert done.status == "failed" and words in done.error.message, done.error
    assert done.error.code == "invalid_training_file" and done.error.param == "training_file"
    assert gateway.admin("GET", "/tenants/alpha/adapters/broken-dpo").status_code == 404


def test_a_preference_file_given_to_supervised_training_says_what_it_is(gateway, worker):  # noqa: F811
    alpha = gateway.client(gateway.tenants["alpha"].key)
    job = alpha.fine_tuning.jobs.create(model=gateway.settings.served_model_name, suffix="broken-sft",
                                        training_file=upload(alpha, PAIRS, "pairs.jsonl").id)
    done = wait_for(alpha, job.id, ("succeeded", "failed", "cancelled"), timeout=120)
    assert done.status == "failed" and 'line 1: a preference pair for DPO' in done.error.message, done.error
    assert 'method {"type": "dpo"}' in done.error.message


def test_the_dpo_loss_and_figures_are_the_papers():
    """Two pairs by hand (beta 0.5): DPO's loss -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), the implicit
    reward's ranking, and the held-out figures the job reports."""
    import torch

    from adapters.train.dpo import dpo_loss, preference_metrics

    logps, reference = torch.tensor([[-5.0, -3.0], [-2.0, -4.0]]), torch.tensor([[-6.0, -3.0], [-2.0, -2.0]])
    losses, right = dpo_loss(logps, reference, 0.5)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(torch.tensor([0.5, 1.0])))
    assert right == 2
    figures = preference_metrics(logps, reference, 0.5)
    assert figures["preference_accuracy"] == 0.5 and figures["logprob_margin"] == 0.0
    assert figures["reward_margin"] == pytest.approx(0.75) and figures["pairs"] == 2
    assert preference_metrics(reference, reference, 0.5)["dpo_loss"] == pytest.approx(0.6931, abs=1e-4)


def test_an_over_long_pair_is_refused_by_its_line_once(gateway):
    """Both answers of a pair are tokenized; a pair too long for max_seq_len is named by its line, once."""
    from adapters.train.data import DataError
    from adapters.train.preferences import Pair, tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(gateway.settings.model_path)
    prompt = [{"role": "user", "content": "Hi?"}]
    pairs = [Pair(prompt, "Ahoy!", "Hello.", 1), Pair(prompt, "Arr! " * 200, "Hey. " * 200, 2)]
    assert [len(pair) for pair in tokenize_pairs(tokenizer, pairs[:1], 64)] == [2]
    with pytest.raises(DataError) as refused:
        tokenize_pairs(tokenizer, pairs, 64)
    assert refused.value.lines == [2] and "1 example(s) are longer than max_seq_len (64 tokens): line 2" in str(
        refused.value)
