"""MRML bridge of the mmreg extension: converts between Slicer MRML nodes and the engine's data.

The engine (:mod:`mmreg`) works on SimpleITK images in LPS physical space and on dense
displacement fields (LPS mm, fixed grid, resampling convention). This package imports
``slicer``/``vtk`` and only converts data; it holds no registration logic. See
:mod:`mmreg_slicer.bridge` for the conventions.
"""
from .bridge import (  # noqa: F401
    LPS_TO_RAS,
    displacement_from_grid_transform_node,
    grid_transform_node_from_displacement,
    harden,
    image_from_volume_node,
    place_under_transform,
    scalar_map_node_from_image,
    segmentation_node_from_labelmap_image,
    segmentation_to_labelmap_image,
    set_scalar_display,
    volume_node_from_image,
    warp_segmentation_node,
)

__all__ = [
    "LPS_TO_RAS",
    "image_from_volume_node",
    "volume_node_from_image",
    "scalar_map_node_from_image",
    "set_scalar_display",
    "grid_transform_node_from_displacement",
    "displacement_from_grid_transform_node",
    "place_under_transform",
    "harden",
    "segmentation_to_labelmap_image",
    "segmentation_node_from_labelmap_image",
    "warp_segmentation_node",
]
