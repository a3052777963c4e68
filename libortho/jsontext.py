"""Parsing JSON that comes from outside (manifests, records, key files, flags) without a traceback.

The standard library parses nested arrays and objects by recursion, so a document nested a few
thousand levels deep raises RecursionError instead of a JSON error. `loads` turns that into the
JSONDecodeError every caller already reports as "invalid JSON".
"""
from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """json.loads, with a document nested deeper than Python's recursion limit refused as a
    JSONDecodeError ("nested too deeply") like any other malformed document."""
    try:
        return json.loads(text)
    except RecursionError:
        shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
        raise json.JSONDecodeError("nested too deeply to parse", shown[:64], 0) from None
