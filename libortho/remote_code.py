"""libortho never runs code shipped inside a model folder.

transformers can import Python files named by `auto_map` in config.json or tokenizer_config.json
(and asks on stdin when trust_remote_code is unset). libortho always passes
trust_remote_code=False and refuses such folders up front with a message saying why.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import jsontext
from .artifact_format import ArtifactError

_FILES = ("config.json", "tokenizer_config.json")


def refuse_custom_code(folder: Path, shown_as: Path | None = None) -> None:
    """Raise ArtifactError when `folder` needs custom code (an `auto_map` entry) or its config is not JSON."""
    shown = Path(shown_as) if shown_as is not None else Path(folder)
    for name in _FILES:
        file = Path(folder) / name
        if not file.is_file():
            continue
        try:
            data = jsontext.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{shown / name} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{shown / name} must be a JSON object, got {type(data).__name__}")
        if data.get("auto_map"):
            raise ArtifactError(
                f"{shown / name} has an auto_map entry: this model needs custom code from its folder, and "
                "libortho never runs code from a model folder (trust_remote_code=False)"
            )
