"""Health probes for the loraserve containers; exit status 0 means healthy.

    probe.py URL                 GET the URL; healthy on a 2xx answer within 5 s (gateway, engine)
    probe.py --process NAME      a `loraserve NAME` process runs in this container (the worker)
    probe.py --model             the base model folder the settings name is ready (init containers wait on it)

The images have no curl; this uses the standard library only (the `--model` check imports the
project's settings, so it sees exactly the path the gateway, engine and worker will use).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def check_url(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_process(name: str, proc: Path = Path("/proc")) -> bool:
    """A process whose command line is `... loraserve NAME ...` (or `-m server.cli NAME`)."""
    own = str(os.getpid())
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == own:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if name in args and any(a.endswith("loraserve") or a == "server.cli" for a in args):
            return True
    return False


def check_model() -> bool:
    from adapters.basemodel import is_model_folder
    from server.config import Settings

    path = Settings().model_path
    ready = is_model_folder(path)  # the folder is renamed into place whole, so present means complete
    if not ready:
        print(f"base model not ready at {path}", file=sys.stderr)
    return ready


def main(argv: list[str]) -> int:
    if argv[:1] == ["--process"] and len(argv) == 2:
        return 0 if check_process(argv[1]) else 1
    if argv == ["--model"]:
        return 0 if check_model() else 1
    if len(argv) == 1 and argv[0].startswith(("http://", "https://")):
        return 0 if check_url(argv[0]) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
