"""The one naming rule for tenants and adapters.

Lower-case letters, digits and single hyphens, at most 63 characters: `[a-z0-9][a-z0-9-]{0,62}` from
the design, tightened to forbid `--` and a trailing hyphen, because the engine-side name
`<tenant>--<adapter>--v<N>` must map back to exactly one tenant and adapter.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
MAX_LEN = 63


class InvalidName(ValueError):
    pass


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_LEN and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str) -> str:
    if not is_valid_name(value):
        shown = value if isinstance(value, str) and value.isprintable() and len(value) <= 80 else "given"
        raise InvalidName(
            f"The {what} name '{shown}' is not valid: use 1 to 63 lower-case letters, digits and single "
            "hyphens, starting and ending with a letter or digit."
        )
    return value


def engine_name(tenant: str, adapter: str, version: int) -> str:
    """The name an adapter version is loaded under on the engine; never a client's string."""
    return f"{check_name(tenant, 'tenant')}--{check_name(adapter, 'adapter')}--v{int(version)}"


def parse_engine_name(name: str) -> tuple[str, str, int] | None:
    """(tenant, adapter, version) of an `engine_name`, or None for any other name (the base model's stand-in)."""
    parts = name.split("--")
    if len(parts) != 3 or not all(map(is_valid_name, parts[:2])):
        return None
    version = parts[2].removeprefix("v")
    if not (parts[2].startswith("v") and version.isascii() and version.isdigit()):
        return None
    return parts[0], parts[1], int(version)
