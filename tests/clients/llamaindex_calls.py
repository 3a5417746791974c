"""LlamaIndex's `OpenAILike` against the gateway, as a chat model and as a completions model, each called and
streamed. Run by tests/test_clients_frameworks.py in the clients' venv."""

from __future__ import annotations

from calls import BASE_URL, KEY, MODEL, report
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike


def llm(is_chat_model: bool) -> OpenAILike:
    return OpenAILike(model=MODEL, api_base=BASE_URL, api_key=KEY, is_chat_model=is_chat_model,
                      context_window=2048, max_tokens=16, temperature=0, max_retries=0, timeout=300)


def chat():
    answer = llm(True).chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")])
    return {"role": str(answer.message.role.value), "content": answer.message.content}


def stream_chat():
    deltas = [r.delta for r in llm(True).stream_chat([ChatMessage(role="user", content="Count to five.")])]
    return {"text": "".join(d or "" for d in deltas), "chunks": len(deltas)}


def complete():
    return {"text": llm(False).complete("The capital of France is").text}


def stream_complete():
    deltas = [r.delta for r in llm(False).stream_complete("One, two,")]
    return {"text": "".join(d or "" for d in deltas), "chunks": len(deltas)}


if __name__ == "__main__":
    report({"chat": chat, "stream_chat": stream_chat, "complete": complete, "stream_complete": stream_complete})
