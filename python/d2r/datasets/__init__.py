"""Datasets: realmix benchmark loader and cached RootSIFT features, the built-in demo set
(generated from scikit-image sample photos), Revisited Oxford/Paris, plain folders and R1M."""
from d2r.datasets.demo import (
    BACKGROUND_PHOTOS,
    LICENCES,
    OBJECT_PHOTOS,
    DemoSet,
    demo_set_dir,
    load_demo_set,
    make_demo_set,
    skimage_data_dir,
)
from d2r.datasets.realmix import (
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
from d2r.datasets.revisited import (
    IMAGE_EXTENSIONS,
    REVISITED_NAMES,
    RevisitedSet,
    crop_box,
    iter_r1m,
    load_folder,
    load_revisited,
)

__all__ = [
    "BACKGROUND_PHOTOS",
    "DemoSet",
    "IMAGE_EXTENSIONS",
    "LICENCES",
    "OBJECT_PHOTOS",
    "REVISITED_NAMES",
    "RevisitedSet",
    "crop_box",
    "demo_set_dir",
    "iter_r1m",
    "load_demo_set",
    "load_folder",
    "load_revisited",
    "make_demo_set",
    "skimage_data_dir",
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
