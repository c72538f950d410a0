"""Regions of database images, in one place: box selection and regions from boxes
(:mod:`d2r.regions.select`, re-exported here), proposals, detectors and region sources by name
(:mod:`d2r.regions.detect`), and regions discovered from the collection itself
(:mod:`d2r.regions.discover`)."""
from d2r.regions.select import (DEFAULT_SCORE_THRESHOLD, RegionStats, boxes_from_normalized, crop_bounds,
                                grid_proposals, regions_by_reextraction, regions_by_selection, select_boxes)

__all__ = ["DEFAULT_SCORE_THRESHOLD", "RegionStats", "boxes_from_normalized", "crop_bounds", "grid_proposals",
           "regions_by_reextraction", "regions_by_selection", "select_boxes"]
