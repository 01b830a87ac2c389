"""Fixtures for the generative tests: a hand-made SQuAD file and tiny models built in code."""

from __future__ import annotations

import json

import pytest
from gen_helpers import make_squad

from deftune.data.squad import SquadExample, parse_squad


@pytest.fixture
def squad_file(tmp_path):
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(make_squad()), encoding="utf-8")
    return path


@pytest.fixture
def examples() -> list[SquadExample]:
    return parse_squad(make_squad(1))
