"""The common OpenAI-compatible frameworks, their current PyPI releases, against the real gateway and engine.

Each framework runs in a venv of its own (`make clients-venvs`, pinned by tests/clients/*.lock): their pins clash
with the engine's and with each other's (LlamaIndex wants openai<3, the Agents SDK openai>=3), as they would on a
user's machine, where they never share the server's environment either. A script per framework
(tests/clients/*_calls.py) makes the calls its users make and reports what came back; the tests here judge it.
Guards issue 13's "what works today and must keep working" (LangChain, LlamaIndex, the Agents SDK's chat model)
and its rows for the Agents SDK's default model (the Responses API, a 404 before) and LangChain's bind_tools.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.conftest import REPO

CLIENTS = REPO / "tests" / "clients"
VENVS = REPO / ".cache" / "clients"


def run_calls(gateway, framework: str, model: str = "support") -> dict:
    """Run tests/clients/<framework>_calls.py in its venv against tenant alpha; its report by case."""
    python = VENVS / framework / "bin" / "python"
    assert python.exists(), f"{python} is missing: `make clients-venvs` makes it (`make test` does)"
    # Only what the client needs: no admin key, no settings of the gateway, no network (HF, LangSmith) lookups.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()), "PYTHONPATH": str(CLIENTS),
           "LORASERVE_BASE_URL": f"{gateway.url}/v1", "LORASERVE_KEY": gateway.tenants["alpha"].key,
           "LORASERVE_MODEL": model, "HF_HUB_OFFLINE": "1", "LANGSMITH_TRACING": "false",
           "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    run = subprocess.run([str(python), str(CLIENTS / f"{framework}_calls.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def case(report: dict, name: str):
    result = report[name]
    assert not (isinstance(result, dict) and "error" in result), f"{name}: {result.get('error')}\n{result['trace']}"
    return result


@pytest.fixture(scope="module")
def langchain(gateway):
    return run_calls(gateway, "langchain")


@pytest.fixture(scope="module")
def llamaindex(gateway):
    return run_calls(gateway, "llamaindex")


@pytest.fixture(scope="module")
def agents(gateway):
    return run_calls(gateway, "agents")


def test_langchain_invoke_answers_with_the_adapters_name_and_usage(langchain):
    answer = case(langchain, "invoke")
    assert answer["content"] and answer["model"] == "support"
    assert answer["usage"]["input_tokens"] > 0 and answer["usage"]["output_tokens"] > 0


def test_langchain_stream_gives_chunks_and_usage(langchain):
    answer = case(langchain, "stream")
    assert answer["text"] and answer["chunks"] > 2 and answer["usage"]["output_tokens"] > 0


def test_langchain_structured_output_fills_the_pydantic_model(langchain):
    city = case(langchain, "structured_output")
    assert isinstance(city["name"], str) and isinstance(city["country"], str)


def test_langchain_bind_tools_calls_the_named_tool(langchain):
    calls = case(langchain, "bound_tool")["tool_calls"]
    assert calls and calls[0]["name"] == "get_weather" and isinstance(calls[0]["args"]["city"], str)


def test_langchain_responses_api_mode_answers(langchain):
    answer = case(langchain, "responses_api")
    assert answer["text"] and answer["model"] == "support"


def test_llamaindex_openai_like_chats(llamaindex):
    answer = case(llamaindex, "chat")
    assert answer["role"] == "assistant" and answer["content"]


@pytest.mark.parametrize("name", ["stream_chat", "stream_complete"])
def test_llamaindex_openai_like_streams(llamaindex, name):
    answer = case(llamaindex, name)
    assert answer["text"] and answer["chunks"] > 2


def test_llamaindex_openai_like_completes(llamaindex):
    assert case(llamaindex, "complete")["text"]


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_answers_in_text(agents, api):
    """`responses`: the Agents SDK's default model, which got a 404 before issue 13."""
    answer = case(agents, f"{api}_text")
    assert isinstance(answer["final_output"], str) and answer["final_output"] and answer["items"] >= 1


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_streams(agents, api):
    answer = case(agents, f"{api}_streamed")
    assert answer["final_output"] and "raw_response_event" in answer["kinds"] and answer["events"] > 2


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_an_agent_calls_its_function_tool(agents, api):
    answer = case(agents, f"{api}_tool")
    assert answer["cities"] and answer["final_output"] == f"Sunny in {answer['cities'][0]}."


class City(BaseModel):
    name: str
    country: str


def test_the_sdks_parse_fills_a_pydantic_model(gateway):
    """`chat.completions.parse()` with a pydantic `response_format`, which LangChain's structured output builds on."""
    client = gateway.client(gateway.tenants["alpha"].key)
    answer = client.chat.completions.parse(model="support", response_format=City, max_tokens=200, temperature=0,
                                           messages=[{"role": "user", "content": "Name a city and its country."}])
    city = answer.choices[0].message.parsed
    assert isinstance(city, City) and answer.model == "support"
