"""View-dependent prompt embeddings, shaped like threestudio's ``PromptProcessorOutput``.

Text-to-3D pipelines condition each render on a prompt that names the direction it is seen from. The rule
follows threestudio (``threestudio/models/prompt_processors/base.py`` at commit 0113b37): every view starts as
``"side"``; a view with ``|azimuth| < front_threshold`` (azimuth wrapped to ``[-180, 180)``, 0 = the object's
front, as carv's cameras) becomes ``"front"``, one with ``|azimuth| > 180 - back_threshold`` becomes
``"back"``, and one with ``elevation > overhead_threshold`` becomes ``"overhead"`` (later rules win).
The prompts are ``"<prompt>, <direction> view"``; the negative prompt is the same for every direction
unless ``negative_prompts_vd`` says otherwise, and it is kept per view, so guidance uses one
unconditional embedding per upstream sample.

:class:`PromptEmbeddings` holds the encoded embeddings and answers threestudio's
``get_text_embeddings(elevation, azimuth, camera_distances, view_dependent_prompting)`` (which returns the
conditional rows followed by the unconditional rows, ``[2B, L, D]``, as threestudio does) and carv's
:meth:`PromptEmbeddings.for_views` (``(cond [B, L, D], uncond [B, L, D])``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DIRECTIONS", "PromptEmbeddings", "check_angles", "check_degrees_batch", "direction_index", "view_prompts"]

DIRECTIONS = ("side", "front", "back", "overhead")
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def view_prompts(prompt: str) -> list[str]:
    """The four direction prompts, in :data:`DIRECTIONS` order."""
    return [f"{prompt}, {d} view" for d in DIRECTIONS]


def direction_index(elevation: Tensor, azimuth: Tensor, front_threshold: float = 45.0,
                    back_threshold: float = 45.0, overhead_threshold: float = 60.0) -> Tensor:
    """Index into :data:`DIRECTIONS` for each view (angles in degrees, shape ``[B]``; not radians)."""
    elevation, azimuth = torch.as_tensor(elevation), torch.as_tensor(azimuth)
    if elevation.shape != azimuth.shape or elevation.ndim != 1:
        raise ValueError(f"elevation, azimuth: expected two tensors of shape [B], got {tuple(elevation.shape)} and "
                         f"{tuple(azimuth.shape)}")
    az = (azimuth.double() + 180.0) % 360.0 - 180.0
    idx = torch.zeros(az.shape, dtype=torch.long, device=az.device)
    idx[(az > -front_threshold) & (az < front_threshold)] = DIRECTIONS.index("front")
    idx[(az > 180.0 - back_threshold) | (az < -180.0 + back_threshold)] = DIRECTIONS.index("back")
    idx[elevation.double() > overhead_threshold] = DIRECTIONS.index("overhead")
    return idx


def check_angles(elevation, azimuth) -> tuple[Tensor, Tensor]:
    """``(elevation, azimuth)`` as tensors after checking them: real numbers, finite, of one shape ``[B]``."""
    out = []
    for name, v in (("elevation", elevation), ("azimuth", azimuth)):
        try:
            t = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: expected a tensor [B] of angles in degrees, got {type(v).__name__}") from e
        if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INTS):
            raise TypeError(f"{name}: expected a tensor [B] of real angles in degrees, got dtype {t.dtype}")
        if t.ndim != 1:
            raise ValueError(f"{name}: expected a tensor [B] of angles in degrees, got shape {tuple(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected finite angles in degrees, got {t.tolist()[:8]}")
        out.append(t)
    if out[0].shape != out[1].shape:
        raise ValueError(f"elevation, azimuth: expected two tensors of shape [B], got {tuple(out[0].shape)} and "
                         f"{tuple(out[1].shape)}")
    return out[0], out[1]


def check_degrees_batch(elevation: Tensor, azimuth: Tensor) -> None:
    """ValueError when a batch of view angles looks like radians.

    Decidable only for a batch of several views: it is refused when every ``|azimuth| <= 2 pi``, every
    ``|elevation| <= pi / 2``, and the azimuths spread over more than 1 (57 degrees if radians; a degree batch
    would have to sit within 6.3 degrees of the front, spread over more than 1 degree, and within 1.6 degrees of
    the horizon). A single view, or views with equal azimuths, cannot be told apart and pass."""
    el = torch.as_tensor(elevation, dtype=torch.float64).detach().cpu().flatten()
    az = torch.as_tensor(azimuth, dtype=torch.float64).detach().cpu().flatten()
    if az.numel() < 2 or el.numel() != az.numel():
        return
    spread = float(az.max() - az.min())
    if spread > 1.0 and float(az.abs().max()) <= 2 * math.pi and float(el.abs().max()) <= math.pi / 2:
        raise ValueError(f"azimuth: expected degrees, got {az.numel()} views with azimuths in "
                         f"[{float(az.min()):.3g}, {float(az.max()):.3g}] and elevations within +-pi/2, which look "
                         f"like radians (convert with torch.rad2deg, or pass check_degrees=False if they are degrees)")


@dataclass
class PromptEmbeddings:
    """Encoded prompt and negative prompt: plain ``[1, L, D]`` and per direction ``[4, L, D]``.

    Field names follow threestudio's ``PromptProcessorOutput`` so that code written for either reads both.
    """

    text_embeddings: Tensor
    uncond_text_embeddings: Tensor
    text_embeddings_vd: Tensor
    uncond_text_embeddings_vd: Tensor
    directions: tuple[str, ...] = DIRECTIONS
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    prompt: str = ""
    negative_prompt: str = ""
    direction2idx: dict[str, int] = field(default_factory=lambda: {d: i for i, d in enumerate(DIRECTIONS)})
    use_perp_neg: bool = False

    def for_views(self, elevation: Tensor, azimuth: Tensor, view_dependent_prompting: bool = True,
                  check_degrees: bool = True) -> tuple[Tensor, Tensor]:
        """``(cond, uncond)``, each ``[B, L, D]``: one conditional and one negative embedding per view.

        ``elevation`` and ``azimuth`` are in degrees (``[B]`` each). With ``check_degrees`` a batch that can only
        be a radian batch of a multi-view run is refused (:func:`check_degrees_batch`)."""
        elevation, azimuth = check_angles(elevation, azimuth)
        if check_degrees:
            check_degrees_batch(elevation, azimuth)
        B = elevation.shape[0]
        if not view_dependent_prompting:
            return (self.text_embeddings.expand(B, -1, -1), self.uncond_text_embeddings.expand(B, -1, -1))
        idx = direction_index(elevation, azimuth, self.front_threshold, self.back_threshold,
                              self.overhead_threshold).to(self.text_embeddings_vd.device)
        return self.text_embeddings_vd[idx], self.uncond_text_embeddings_vd[idx]

    def get_text_embeddings(self, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor | None = None,
                            view_dependent_prompting: bool = True) -> Tensor:
        """threestudio's call: the ``B`` conditional rows, then the ``B`` unconditional rows (``[2B, L, D]``)."""
        cond, uncond = self.for_views(elevation, azimuth, view_dependent_prompting)
        return torch.cat([cond, uncond], 0)
