"""Datasets (realmix benchmark loader and cached RootSIFT features)."""
from .realmix import (
    FAMILIES,
    RealMix,
    default_cache_dir,
    find_realmix,
    find_shared_data,
    load_realmix,
    realmix_descriptor_sample,
    realmix_family,
    realmix_rootsift,
)

__all__ = [
    "FAMILIES",
    "RealMix",
    "default_cache_dir",
    "find_realmix",
    "find_shared_data",
    "load_realmix",
    "realmix_descriptor_sample",
    "realmix_family",
    "realmix_rootsift",
]
