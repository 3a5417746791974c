"""What the framework scripts here share: where the gateway is, and one JSON report of every case.

Each script in this folder runs in its framework's own venv (`make clients-venvs`: current releases, whose pins
clash with the engine's and with each other's), drives the gateway the way a user of that framework would, and
prints one JSON object: case name -> what the framework returned, or {"error": "..."} so one failing case hides
no other.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import traceback
from collections.abc import Callable

BASE_URL = os.environ.get("LORASERVE_BASE_URL", "http://127.0.0.1:8000/v1")
KEY = os.environ.get("LORASERVE_KEY", "")
MODEL = os.environ.get("LORASERVE_MODEL", "default")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def report(cases: dict[str, Callable[[], object]]) -> None:
    """Run every case and print what each returned (or how it failed) as one JSON object. Async cases share one
    event loop, as an async client may only be used on the loop it was first used on."""
    results: dict[str, object] = {}
    loop = asyncio.new_event_loop()
    for name, case in cases.items():
        try:
            result = case()
            results[name] = loop.run_until_complete(result) if inspect.isawaitable(result) else result
        except Exception as exc:  # a report, not a crash: the test names the failing case
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc(limit=-4)}
    json.dump(results, sys.stdout, default=str)
