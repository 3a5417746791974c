"""The README is part of the product: it lists every setting, with its default."""

from __future__ import annotations

import re

from server.config import Settings
from tests.conftest import REPO


def test_every_setting_has_a_row_in_the_readme():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(LORASERVE_[A-Z_]+)` \|([^|]*)\|", readme, re.M))
    missing = [f"LORASERVE_{name.upper()}" for name in Settings.model_fields
               if f"LORASERVE_{name.upper()}" not in rows]
    assert not missing, f"settings missing from the README's table: {missing}"
    unknown = [name for name in rows if name.removeprefix("LORASERVE_").lower() not in Settings.model_fields]
    assert not unknown, f"README rows for settings that do not exist: {unknown}"
