"""The docs follow the code: every built-in loss has its row in docs/losses.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefopt.registry.loading import default_plugins

ROOT = Path(__file__).parent.parent
BUILTIN_LOSSES = [i.name for i in default_plugins().losses.infos() if i.provider.startswith("prefopt ")]


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_every_builtin_loss_has_a_row_in_the_losses_doc(name):
    rows = [line for line in (ROOT / "docs" / "losses.md").read_text().splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"docs/losses.md needs exactly one row for {name}"
