"""Model I/O, kept for compatibility: the names that used to live here.

Opening models (Hugging Face folders, GGUF files, the built-in default, the device) lives in
libortho/sources.py; libortho artifacts (save / load) live in libortho/artifact.py.
"""
from __future__ import annotations

from .artifact import is_artifact, layer_table, load, read_manifest, save, verify_files  # noqa: F401 (re-exported)
from .artifact_check import (  # noqa: F401 (re-exported)
    BASE_FILE, FORMAT_VERSION, MANIFEST, ORTHO_FILE, ORTHO_KEYS, ArtifactError, sha256_file,
)
from .sources import (  # noqa: F401 (re-exported)
    DEFAULT_GGUF_FILE,
    DEFAULT_GGUF_PACKAGE,
    _atomic_save_pretrained,
    _clear_errors,
    _drop_gguf_quant_config,
    _gguf_cache_path,
    cache_dir,
    default_device,
    default_model_source,
    load_model,
)
