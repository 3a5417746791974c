"""The layout of `server/`: one subpackage per concern, and imports that only go downwards.

Guards issue 13's "imports one-way": the error tree and the wire types at the bottom, the storage layer
below the engine and the serving path, FastAPI (the HTTP surface) on top. An import needed only for a type
may go upwards under `if TYPE_CHECKING:`; nothing else may.
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"
LAYERS = ["errors", "config", "wire", "storage", "engine", "observability", "serving", "finetuning", "evaluation",
          "publishing", "services", "console", "api", "cli"]
RANK = {name: (0 if name in ("errors", "config") else i) for i, name in enumerate(LAYERS)}


def server_imports(path: Path) -> list[str]:
    """The `server` subpackages or modules a file imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith("server.")]
        elif isinstance(node, ast.ImportFrom) and node.module == "server":
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("server."):
            found.append(node.module.split(".")[1])
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in SERVER.iterdir()
            if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir())}
    assert tops <= set(LAYERS), f"not in a layer: {sorted(tops - set(LAYERS))}"


def test_imports_only_go_downwards():
    upwards = []
    for path in SERVER.rglob("*.py"):
        own = path.relative_to(SERVER).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for imported in server_imports(path):
            if RANK[imported] > RANK[own]:
                upwards.append(f"{path.relative_to(SERVER.parent)} ({own}) imports {imported}")
    assert not upwards, "\n".join(upwards)
