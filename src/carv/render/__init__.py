"""Differentiable volume rendering, cameras and procedural scenes (used by the text-to-3D app only).

Bottom layer: imports nothing from the rest of carv.
"""

from carv.render.cameras import (
    DEFAULT_ELEVATION_RANGE,
    DEFAULT_FOV_DEG,
    DEFAULT_RADIUS,
    VIEW_NAMES,
    Cameras,
    cameras_from_angles,
    cameras_from_unit,
    elevation_label,
    random_cameras,
    turntable_cameras,
    view_label,
)
from carv.render.scenes import PROMPTS, SCENES, Scene, find_scene, get_scene, normalize_prompt, prompt_index
from carv.render.volume import RenderOutput, VoxelGrid, composite, opaque_loss, render, render_rays, sparsity_loss

__all__ = [
    "Cameras", "cameras_from_angles", "cameras_from_unit", "random_cameras", "turntable_cameras", "view_label",
    "elevation_label",
    "VIEW_NAMES",
    "DEFAULT_RADIUS", "DEFAULT_FOV_DEG", "DEFAULT_ELEVATION_RANGE",
    "VoxelGrid", "RenderOutput", "render", "render_rays", "composite", "sparsity_loss", "opaque_loss",
    "Scene", "SCENES", "PROMPTS", "find_scene", "get_scene", "normalize_prompt", "prompt_index",
]
