"""LangChain's `ChatOpenAI` against the gateway: invoke, stream (with usage), structured output, bound tools and
LangChain's Responses API mode. Run by tests/test_clients_frameworks.py in the clients' venv."""

from __future__ import annotations

from calls import BASE_URL, KEY, MODEL, WEATHER, report
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel


class City(BaseModel):
    name: str
    country: str


def chat(max_tokens: int = 24, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=BASE_URL, api_key=KEY, model=MODEL, temperature=0, max_tokens=max_tokens,
                      max_retries=0, timeout=300, **kwargs)


def invoke():
    answer = chat().invoke([SystemMessage("Be brief."), HumanMessage("Say hello.")])
    return {"content": answer.content, "model": answer.response_metadata.get("model_name"),
            "usage": answer.usage_metadata}


def stream():
    chunks = list(chat(stream_usage=True).stream("Count to five."))
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    return {"text": "".join(c.content for c in chunks), "chunks": len(chunks), "usage": usage[-1] if usage else None}


def structured_output():
    city = chat(max_tokens=200).with_structured_output(City).invoke("Name a city in France and its country.")
    return city.model_dump()


def bound_tool():
    answer = chat(max_tokens=48).bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    return {"tool_calls": answer.tool_calls}


def responses_api():
    answer = chat(use_responses_api=True).invoke("Say hello.")
    return {"text": answer.text, "model": answer.response_metadata.get("model_name")}


if __name__ == "__main__":
    report({"invoke": invoke, "stream": stream, "structured_output": structured_output, "bound_tool": bound_tool,
            "responses_api": responses_api})
