"""The built-in name and word lists that synthetic records draw from: the scenario's private
records and the look-alike templates fill their names and words from these same lists.

The lists are data, kept in names.json next to this module (package data, like the kernels'
tuned configs). Changing a list changes every seeded record built from it.
"""
from __future__ import annotations

import json
from pathlib import Path

_LISTS = json.loads(Path(__file__).with_name("names.json").read_text(encoding="utf-8"))

FIRST_NAMES: tuple[str, ...] = tuple(_LISTS["first_names"])
LAST_NAMES: tuple[str, ...] = tuple(_LISTS["last_names"])
ADJECTIVES: tuple[str, ...] = tuple(_LISTS["adjectives"])
NOUNS: tuple[str, ...] = tuple(_LISTS["nouns"])
