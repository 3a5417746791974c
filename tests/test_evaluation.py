"""Golden-set evaluation of adapter versions (issue 15, items 1 and 2): the set's checks, the scores, and reports
made on the real engine for each uploaded version, against the base model, few-shot prompting and the version it
replaces; each tenant sees only its own."""

from __future__ import annotations

import csv
import io
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.train.data import DataError
from adapters.zero import ensure_zero_adapter
from server.evaluation.evaluator import few_shot_prompts
from server.evaluation.golden_set import Example, first_examples, load_golden_set
from server.evaluation.scoring import ExampleScore, aggregate, exact_match, token_f1
from tests.conftest import ADMIN_KEY, make_peft_adapter
from tests.test_admin import new_tenant, upload_files

QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "What color is grass?",
             "How many days are in a week?"]
BRIEF = {"role": "system", "content": "Answer in one short sentence."}


def jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def chat(question: str, answer: str | None, system: dict | None = None) -> dict:
    messages = [*([system] if system else []), {"role": "user", "content": question}]
    return {"messages": messages + ([{"role": "assistant", "content": answer}] if answer is not None else [])}


@pytest.mark.parametrize("line, problem", [
    (chat("Where is Paris?", None), "no reference answer"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "no reference answer"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "no prompt"),
    ({"prompt": "Where is Paris?"}, '"messages" list'),
])
def test_a_golden_set_line_without_a_usable_answer_is_refused_by_its_number(tmp_path, line, problem):
    """Guards the issue's bad input: a golden set with no assistant answers is refused naming the line."""
    path = tmp_path / "golden.jsonl"
    path.write_bytes(jsonl([chat("What is 2 + 2?", "4"), line]))
    with pytest.raises(DataError, match=f"golden set line 2: .*{problem}") as caught:
        load_golden_set(path)
    assert caught.value.lines == [2]


def test_a_golden_set_keeps_the_prompt_and_its_reference_answer(tmp_path):
    path = tmp_path / "golden.jsonl"
    system = {"role": "system", "content": "Be brief."}
    path.write_bytes(jsonl([{"messages": [system, *chat("What is 2 + 2?", "4")["messages"]]}]))
    [example] = load_golden_set(path)
    assert example == Example([system, {"role": "user", "content": "What is 2 + 2?"}], "4", 1)


def test_scores_ignore_case_spacing_and_end_punctuation_and_count_shared_words():
    assert exact_match("  The capital is  PARIS.", "the capital is Paris")
    assert not exact_match("Paris", "The capital is Paris")
    assert token_f1("Paris is the capital", "the capital is Paris") == 1.0
    assert token_f1("Paris", "The capital is Paris") == pytest.approx(2 * 1 * 0.25 / 1.25)
    assert token_f1("Lyon", "Paris") == 0.0
    score = aggregate([ExampleScore(nll=2.0, tokens=2, generated="4"), ExampleScore(nll=4.0, tokens=2, generated="x")],
                      ["4", "y"])
    assert (score.loss, score.exact_match, score.answer_tokens) == (1.5, 0.5, 4)


def test_few_shot_prompts_never_show_an_example_its_own_answer():
    examples = [Example([{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"}], f"a{i}", i)
                for i in range(5)]
    for example, prompt in zip(examples, few_shot_prompts(examples), strict=True):
        assert prompt[0] == {"role": "system", "content": "S"} and prompt[-1] == example.prompt[-1]
        shown = [m["content"] for m in prompt if m["role"] == "assistant"]
        assert len(shown) == 3 and example.answer not in shown


def base_answers_golden_set(gateway, client) -> str:
    """A golden set of the base model's own greedy answers (whole ones): the base model matches it exactly."""
    references = []
    for question in QUESTIONS:
        reply = client.chat.completions.create(model=gateway.settings.served_model_name, temperature=0, max_tokens=200,
                                               messages=chat(question, None, BRIEF)["messages"]).choices[0]
        assert reply.finish_reason == "stop", (question, reply.message.content)  # a whole answer, not a cut one
        references.append(chat(question, reply.message.content, BRIEF))
    return client.files.create(file=("golden.jsonl", jsonl(references)), purpose="evals").id


def test_few_shot_prompts_can_show_the_training_datas_examples_instead():
    examples = [Example([{"role": "user", "content": f"q{i}"}], f"a{i}", i) for i in range(4)]
    shots = [Example([{"role": "user", "content": f"t{i}"}], f"s{i}", i) for i in range(5)]
    for example, prompt in zip(examples, few_shot_prompts(examples, shots), strict=True):
        assert [m["content"] for m in prompt] == ["t0", "s0", "t1", "s1", "t2", "s2", example.prompt[0]["content"]]


def test_the_first_examples_of_a_training_file_are_read_from_chat_lines_or_preference_pairs(tmp_path):
    """The few-shot baseline's solved examples: a job's chat file (lines of another shape passed over) or DPO file."""
    chat_file, pairs_file = tmp_path / "chat.jsonl", tmp_path / "pairs.jsonl"
    chat_file.write_bytes(jsonl([chat("Hi?", "Hello."), {"bad": 1}, chat("Bye?", "Bye."), chat("More?", "No.")]))
    pairs_file.write_bytes(jsonl([{"input": {"messages": [{"role": "user", "content": "Bees?"}]},
                                   "preferred_output": [{"role": "assistant", "content": "Honey, arr!"}],
                                   "non_preferred_output": [{"role": "assistant", "content": "Honey."}]}]))
    assert [(e.answer, e.line) for e in first_examples(chat_file, 2, preferences=False)] == [("Hello.", 1),
                                                                                            ("Bye.", 3)]
    [pair] = first_examples(pairs_file, 3, preferences=True)
    assert pair.prompt == [{"role": "user", "content": "Bees?"}] and pair.answer == "Honey, arr!"


@pytest.fixture(scope="module")
def graded(gateway, tmp_path_factory, base_model_path):
    """Tenant `grader` with adapter `graded`: version 1 a random adapter, then a golden set of the base model's own
    greedy answers, then version 2 the all-zero adapter (the base model exactly), evaluated as it was published."""
    key = new_tenant(gateway, "grader")
    client = gateway.client(key)
    folder = tmp_path_factory.mktemp("graded")
    random_adapter = make_peft_adapter(base_model_path, folder / "random", seed=11, b_std=0.2)
    assert upload_files(gateway, "grader", "graded", random_adapter).status_code == 201
    golden = base_answers_golden_set(gateway, client)
    # The openai SDK's own calls for paths it has no method for, as the README shows them.
    attached = client.patch("/adapters/graded", cast_to=object, body={"golden_set": golden})
    assert attached["golden_set"] == golden and attached["promotion"] == "always"
    zero = ensure_zero_adapter(folder / "zero", gateway.services.registry.base)
    uploaded = upload_files(gateway, "grader", "graded", zero)
    assert uploaded.status_code == 201, uploaded.text
    return key, client, golden, uploaded.json()


def httpx_call(gateway, key: str, method: str, path: str, **kwargs):
    return httpx.request(method, f"{gateway.url}/v1{path}", headers={"Authorization": f"Bearer {key}"}, timeout=600,
                         **kwargs)


def test_an_uploaded_version_is_evaluated_against_the_base_few_shot_and_the_version_it_replaces(gateway, graded):
    """The zero adapter is the base model: its loss and answers on the golden set must be the base model's, whose
    greedy answers the set holds (exact match 1), while the random version it replaces scores differently."""
    key, _, golden_id, adapter = graded
    assert adapter["active_version"] == 2
    report = next(v for v in adapter["versions"] if v["version"] == 2)["evaluation"]
    assert report["golden_set"] == golden_id and report["examples"] == len(QUESTIONS) and report["version"] == 2
    golden, general = report["golden"], report["general"]
    assert list(golden) == ["adapter", "replaces", "base", "few_shot"] and list(general) == ["adapter", "replaces",
                                                                                             "base"]
    assert golden["replaces"]["version"] == 1 and golden["few_shot"]["shots"] == 3
    assert golden["few_shot"]["from"] == "golden_set"  # an upload: no training data to draw examples from
    assert golden["base"]["exact_match"] == 1.0 and golden["adapter"]["exact_match"] == 1.0
    assert golden["adapter"]["loss"] == pytest.approx(golden["base"]["loss"], rel=1e-3, abs=1e-3)
    assert general["adapter"]["loss"] == pytest.approx(general["base"]["loss"], rel=1e-3, abs=1e-3)
    assert abs(golden["replaces"]["loss"] - golden["base"]["loss"]) > 1e-2  # the random version is not the base
    assert golden["base"]["perplexity"] > 1.0 and golden["base"]["answer_tokens"] > 0
    assert golden["few_shot"]["loss"] != golden["base"]["loss"]  # other examples before the prompt change it

    # The same report from the tenant API, as JSON and as CSV (one row per set and model).
    fetched = httpx_call(gateway, key, "GET", "/adapters/graded/versions/2/evaluation")
    assert fetched.status_code == 200 and fetched.json() == report
    table = httpx_call(gateway, key, "GET", "/adapters/graded/versions/2/evaluation", params={"format": "csv"})
    assert table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [(r["set"], r["model"]) for r in rows] == [("golden", m) for m in golden] + [("general", m) for m in general]
    assert float(rows[0]["loss"]) == pytest.approx(golden["adapter"]["loss"])


def test_evaluating_on_demand_stores_the_report_with_the_version(gateway, graded):
    """Version 1 was published before the golden set: evaluated on request, its report joins the version list.
    The figures agree across reports: version 1's own are those version 2's report measured for it as the version
    replaced, and the other way round (version 2 is active: it is what version 1 would replace)."""
    key, _, _, adapter = graded
    second = next(v for v in adapter["versions"] if v["version"] == 2)["evaluation"]["golden"]
    made = gateway.client(key).post("/adapters/graded/versions/1/evaluate", cast_to=object)
    first = made["golden"]
    assert first["replaces"]["version"] == 2
    assert first["adapter"]["loss"] == pytest.approx(second["replaces"]["loss"], rel=1e-3, abs=1e-3)
    assert first["replaces"]["loss"] == pytest.approx(second["adapter"]["loss"], rel=1e-3, abs=1e-3)
    listed = gateway.client(key).get("/adapters", cast_to=object)["data"]
    [graded_adapter] = [a for a in listed if a["name"] == "graded"]
    assert {v["version"]: v["evaluation"]["version"] for v in graded_adapter["versions"]} == {1: 1, 2: 2}
    admin_view = gateway.admin("GET", "/tenants/grader/adapters/graded/versions/1/evaluation")
    assert admin_view.status_code == 200 and admin_view.json() == made


def test_a_bad_golden_set_and_another_tenants_things_are_refused_and_nothing_changes(gateway, graded):
    """Guards the issue's bad input: no assistant answers (400 naming the line), another tenant's file, adapter or
    report (404, as if absent), a wrong purpose; the adapter keeps its golden set."""
    key, client, golden_id, _ = graded
    broken = client.files.create(file=("broken.jsonl", jsonl([chat("Hi?", "Hello."), chat("Where?", None)])),
                                 purpose="evals")
    refused = httpx_call(gateway, key, "PATCH", "/adapters/graded", json={"golden_set": broken.id})
    assert refused.status_code == 400 and "line 2" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "invalid_golden_set"

    alpha = gateway.tenants["alpha"].key
    theirs = httpx_call(gateway, alpha, "PATCH", "/adapters/support", json={"golden_set": golden_id})
    assert theirs.status_code == 404  # grader's file, seen from alpha
    for method, path in [("GET", "/adapters/graded"), ("POST", "/adapters/graded/versions/2/evaluate"),
                         ("GET", "/adapters/graded/versions/2/evaluation")]:
        answer = httpx_call(gateway, alpha, method, path)
        assert answer.status_code == 404, (path, answer.text)
        assert "grader" not in answer.text and golden_id not in answer.text
    assert all(a["name"] != "graded" for a in httpx_call(gateway, alpha, "GET", "/adapters").json()["data"])

    no_set = httpx_call(gateway, alpha, "POST", "/adapters/support/versions/1/evaluate")
    assert no_set.status_code == 409 and no_set.json()["error"]["code"] == "no_golden_set"
    missing = httpx_call(gateway, key, "GET", "/adapters/graded/versions/99/evaluation")
    assert missing.status_code == 404
    assert gateway.admin("GET", "/tenants/grader/adapters/graded").json()["golden_set"] == golden_id


def test_the_admin_api_attaches_and_detaches_a_golden_set_and_keys_stay_in_their_lane(gateway, graded):
    key, _, golden_id, _ = graded
    detached = gateway.admin("PATCH", "/tenants/grader/adapters/graded", json={"golden_set": None})
    assert detached.status_code == 200 and detached.json()["golden_set"] is None
    again = gateway.admin("PATCH", "/tenants/grader/adapters/graded", json={"golden_set": golden_id})
    assert again.status_code == 200 and again.json()["golden_set"] == golden_id
    for wrong, status in (({"golden_set": "file-nope"}, 404), ({"promotion": "sometimes"}, 400),
                          ({"max_forgetting": -1}, 400), ({"promotion": None}, 400)):
        assert gateway.admin("PATCH", "/tenants/grader/adapters/graded", json=wrong).status_code == status, wrong
    tenant_on_admin = gateway.admin("POST", "/tenants/grader/adapters/graded/versions/1/evaluate",
                                    headers={"Authorization": f"Bearer {key}"})
    assert tenant_on_admin.status_code == 403
    audit = gateway.admin("GET", "/audit").json()["data"]
    assert any(r["action"] == "adapter.update" and r["object"] == "grader/graded" for r in audit)


def test_metrics_show_the_active_and_newest_evaluated_versions_figures(gateway, graded):
    """A gauge per adapter version, bounded: only the active version and the newest evaluated one are exported
    (version 1, evaluated later on request, is neither)."""
    assert httpx_call(gateway, graded[0], "POST", "/adapters/graded/versions/1/evaluate").status_code == 200
    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "loraserve_adapter_evaluation" and s.labels["tenant"] == "grader"]
    assert {s.labels["version"] for s in samples} == {"2"}
    figures = {(s.labels["set"], s.labels["model"], s.labels["metric"]): s.value for s in samples}
    assert figures["golden", "base", "exact_match"] == 1.0 and figures["golden", "adapter", "exact_match"] == 1.0
    assert {model for _, model, _ in figures} == {"adapter", "replaces", "base", "few_shot"}
