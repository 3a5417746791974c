"""The OpenAI Agents SDK against the gateway: its default model (the Responses API) and its chat-completions model,
each answering in text, streamed, and calling a function tool. Run by tests/test_clients_frameworks.py in the
clients' venv."""

from __future__ import annotations

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from calls import BASE_URL, KEY, MODEL, report
from openai import AsyncOpenAI

set_tracing_disabled(True)  # tracing would post to api.openai.com
client = AsyncOpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0, timeout=300)
set_default_openai_client(client, use_for_tracing=False)
set_default_openai_api("responses")  # the SDK's default; said here so the case names what it tests
CITIES: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    CITIES.append(city)
    return f"Sunny in {city}."


def agent(model, **kwargs) -> Agent:
    settings = ModelSettings(temperature=0, max_tokens=kwargs.pop("max_tokens", 24), **kwargs.pop("settings", {}))
    return Agent(name="assistant", instructions="Be brief.", model=model, model_settings=settings, **kwargs)


async def text(model):
    result = await Runner.run(agent(model), "Say hello.", max_turns=1)
    return {"final_output": result.final_output, "items": len(result.new_items)}


async def streamed(model):
    result = Runner.run_streamed(agent(model), "Count to five.", max_turns=1)
    kinds = [event.type async for event in result.stream_events()]
    return {"final_output": result.final_output, "events": len(kinds), "kinds": sorted(set(kinds))}


async def tool(model):
    # The tool's answer ends the run: the case tests the call, not whether a 135M model stops calling tools.
    CITIES.clear()
    weather = agent(model, max_tokens=48, tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                    settings={"tool_choice": "required"})
    result = await Runner.run(weather, "What is the weather in Paris?", max_turns=2)
    return {"final_output": result.final_output, "cities": list(CITIES)}


def chat_completions_model():
    return OpenAIChatCompletionsModel(model=MODEL, openai_client=client)


if __name__ == "__main__":
    report({"responses_text": lambda: text(MODEL), "responses_streamed": lambda: streamed(MODEL),
            "responses_tool": lambda: tool(MODEL),
            "chat_text": lambda: text(chat_completions_model()),
            "chat_streamed": lambda: streamed(chat_completions_model()),
            "chat_tool": lambda: tool(chat_completions_model())})
