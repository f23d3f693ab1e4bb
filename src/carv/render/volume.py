"""Differentiable emission-absorption volume rendering of density + colour fields.

One renderer serves both the ground truth and the learned scene: :func:`render` takes any *field*,
a callable ``points [..., 3] -> (density [...], rgb [..., 3])``, and a batch of
:class:`~carv.render.cameras.Cameras`. The procedural scenes (:mod:`carv.render.scenes`) are
analytic fields; :class:`VoxelGrid` is the learnable one.

Rendering a ray (``o + t d``, ``d`` unit length):

1. intersect it with the axis-aligned box ``[-bound, bound]^3`` (slab test) -> ``[near, far]``;
   rays that miss get an empty interval and therefore zero opacity;
2. place ``n_samples`` points in ``[near, far]``: one per equal-width bin, at the bin centre
   (``generator=None``, deterministic) or jittered uniformly inside its bin (stratified; pass a
   ``torch.Generator``), every bin of length ``delta = (far - near) / n_samples``;
3. query the field, ``alpha_i = 1 - exp(-sigma_i delta)``, transmittance
   ``T_i = exp(-sum_{j<i} sigma_j delta)`` (a cumulative sum, not a cumulative product of
   ``1 - alpha``, so the gradient stays finite when some ``alpha = 1``), weights ``w_i = T_i alpha_i``;
4. ``rgb = sum_i w_i c_i + (1 - sum_i w_i) background``, ``opacity = sum_i w_i``, and the expected
   termination distance ``depth = sum_i w_i t_i / opacity`` (0 where the ray is empty).

Why plain PyTorch and not nerfacc or a CUDA rasteriser: on these CPU-only machines pytorch3d,
nvdiffrast, kaolin and gsplat's CUDA path are unavailable (see FACTS.md). nerfacc's pure-torch
functions do run on CPU, but for a dense grid with a fixed number of samples per ray they compute
exactly steps 3-4 above on packed rays, which is three tensor ops here; its value is occupancy-grid
skipping and packed variable-length rays, which pay off at high resolution on a GPU, not for
16-64 px images on two cores. Everything below is batched over cameras and rays with
``grid_sample`` doing the trilinear interpolation (one call for all four channels), so a render of
four 32x32 views with 48 samples per ray, forward and backward through a 64^3 grid, takes a few
milliseconds.

:class:`VoxelGrid` stores *raw* values and activates them **after** trilinear interpolation
(DVGO / Plenoxels style): density ``softplus(raw + bias) * scale`` (or ``exp``), colour
``sigmoid(raw)``. Post-activation gives sharp surfaces at low resolution. The defaults are chosen
so that optimisation from scratch works: raw density 0 gives density ``10 softplus(-6) = 0.025``,
an almost transparent volume (opacity about 5% across the box, so a fresh grid renders the
background), an Adam step of 0.1 on raw density changes density by at most ``0.1 * scale = 1``,
and raw values of 10-15 (density 40-90) are opaque within one or two voxels of a 64^3 grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carv.render.cameras import Cameras

__all__ = [
    "Field",
    "RenderOutput",
    "VoxelGrid",
    "ray_box_intersect",
    "sample_along_rays",
    "composite",
    "render",
    "render_rays",
    "sparsity_loss",
    "opaque_loss",
]

Field = Callable[[Tensor], tuple[Tensor, Tensor]]

_DENSITY_ACTIVATIONS = ("softplus", "exp", "relu")
_COLOR_ACTIVATIONS = ("sigmoid", "clamp")


@dataclass
class RenderOutput:
    """``rgb [B, 3, H, W]`` in [0, 1], ``opacity [B, 1, H, W]`` (the mask), ``depth [B, 1, H, W]``
    (``None`` unless asked for)."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor | None = None


def _box(bound, like: Tensor) -> tuple[Tensor, Tensor]:
    """``bound`` (a half-size, or a pair ``(lo, hi)`` of corners) -> ``lo, hi [3]`` tensors."""
    if isinstance(bound, (int, float)) and not isinstance(bound, bool):
        b = float(bound)
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"bound: expected a positive finite half-size of the box, got {bound!r}")
        return (torch.full((3,), -b, dtype=like.dtype, device=like.device),
                torch.full((3,), b, dtype=like.dtype, device=like.device))
    try:
        lo, hi = (torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(3) for v in bound)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"bound: expected a positive number (cube half-size) or a pair of corners (lo[3], hi[3]), got {bound!r}"
        ) from None
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo < hi).all()):
        raise ValueError(f"bound: expected finite corners with lo < hi on every axis, got {bound!r}")
    return lo, hi


def ray_box_intersect(origins: Tensor, dirs: Tensor, bound) -> tuple[Tensor, Tensor]:
    """Entry and exit distances ``near, far [...]`` of rays with the box ``[-bound, bound]^3`` (or the
    axis-aligned box between the corners ``bound = (lo, hi)``).

    Rays that miss the box (or start beyond it) get ``near == far`` (an empty interval).
    """
    lo, hi = _box(bound, origins)
    safe = torch.where(dirs.abs() < 1e-12, torch.full_like(dirs, 1e-12), dirs)
    inv = 1.0 / safe
    t0 = (lo - origins) * inv
    t1 = (hi - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    far = torch.maximum(far, near)
    return near, far


def sample_along_rays(near: Tensor, far: Tensor, n_samples: int,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n_samples`` distances per ray in ``[near, far]`` (``[..., N]``) and the bin width ``[..., 1]``.

    Deterministic bin centres when ``generator`` is None, else stratified (one uniform point per bin).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples!r}")
    delta = ((far - near) / n_samples)[..., None]
    idx = torch.arange(n_samples, device=near.device, dtype=near.dtype)
    if generator is None:
        u = torch.full(near.shape + (n_samples,), 0.5, device=near.device, dtype=near.dtype)
    else:
        u = torch.rand(near.shape + (n_samples,), generator=generator, device=generator.device,
                       dtype=near.dtype).to(near.device)
    return near[..., None] + (idx + u) * delta, delta


def composite(sigma: Tensor, rgb: Tensor, t: Tensor, delta: Tensor, background: Tensor,
              need_depth: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Alpha-composite samples along rays.

    ``sigma [R, N]``, ``rgb [R, N, 3]``, ``t [R, N]``, ``delta [R, 1]`` or ``[R, N]``,
    ``background [R, 3]`` or ``[3]``. Returns ``rgb [R, 3]``, ``opacity [R]``, ``depth [R]`` or None.
    """
    tau = sigma * delta
    # exclusive cumulative optical depth -> transmittance before each sample
    acc = torch.cumsum(tau, dim=-1)
    trans = torch.exp(-(acc - tau))
    weights = trans * (1.0 - torch.exp(-tau))
    opacity = weights.sum(-1)
    color = (weights[..., None] * rgb).sum(-2) + (1.0 - opacity)[..., None] * background
    depth = None
    if need_depth:
        depth = (weights * t).sum(-1) / opacity.clamp_min(1e-8)
        depth = torch.where(opacity > 1e-6, depth, torch.zeros_like(depth))
    return color, opacity, depth


def _background(background, n_rays_per_cam: int, n_cams: int, device, dtype) -> Tensor:
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.ndim == 0:
        bg = bg.expand(3)
    if bg.shape == (3,):
        return bg
    if bg.shape == (n_cams, 3):
        return bg[:, None, :].expand(n_cams, n_rays_per_cam, 3).reshape(-1, 3)
    raise ValueError(
        f"background: expected a scalar, a [3] colour or a [B, 3] colour per camera (B={n_cams}), "
        f"got shape {tuple(bg.shape)}"
    )


def render_rays(field: Field, origins: Tensor, dirs: Tensor, n_samples: int = 64, bound=1.0,
                background: Tensor | float = 0.5, generator: torch.Generator | None = None,
                need_depth: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Render flat rays ``origins, dirs [R, 3]``; ``background`` is ``[3]`` or ``[R, 3]``.

    Returns ``rgb [R, 3]``, ``opacity [R]``, ``depth [R]`` or None. Rays that miss the box are not
    marched at all (they show the background).
    """
    near, far = ray_box_intersect(origins, dirs, bound)
    t, delta = sample_along_rays(near, far, n_samples, generator)
    hit = far > near
    bg = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
    if bool(hit.all()):
        points = origins[:, None, :] + t[..., None] * dirs[:, None, :]
        sigma, rgb = field(points)
        return composite(sigma, rgb, t, delta, bg, need_depth)
    idx = hit.nonzero().squeeze(1)
    t, delta = t[idx], delta[idx]
    points = origins[idx, None, :] + t[..., None] * dirs[idx, None, :]
    sigma, rgb = field(points)
    bg_hit = bg[idx] if bg.ndim == 2 else bg
    rgb_h, op_h, depth_h = composite(sigma, rgb, t, delta, bg_hit, need_depth)
    R = origins.shape[0]
    color = bg.expand(R, 3).to(rgb_h.dtype).index_copy(0, idx, rgb_h)
    opacity = op_h.new_zeros(R).index_copy(0, idx, op_h)
    depth = depth_h.new_zeros(R).index_copy(0, idx, depth_h) if need_depth else None
    return color, opacity, depth


def sparsity_loss(opacity: Tensor) -> Tensor:
    """Mean rendered opacity (threestudio's ``lambda_sparsity`` term): a push towards empty space.

    Score distillation can reproduce the grey background either by removing density or by painting
    background-coloured density (a grey halo that counts as solid in the mask); the images are the same,
    so only a prior breaks the tie. This one charges every unit of opacity, so density the image does not
    need goes. Its gradient with respect to each pixel's opacity is ``1 / n_pixels``."""
    return opacity.mean()


def opaque_loss(opacity: Tensor, eps: float = 1e-3) -> Tensor:
    """Mean binary entropy of the rendered opacity (threestudio's ``lambda_opaque``): pushes every pixel
    to fully transparent or fully opaque, so no half-transparent haze survives. ``opacity`` is clamped to
    ``[eps, 1 - eps]``; the loss is ``log 2`` at opacity 0.5 and about 0 at 0 or 1."""
    o = opacity.clamp(eps, 1.0 - eps)
    return -(o * o.log() + (1.0 - o) * (1.0 - o).log()).mean()


def render(
    field: Field,
    cameras: Cameras,
    height: int,
    width: int | None = None,
    n_samples: int = 64,
    bound: float | tuple = 1.0,
    background: Tensor | float | tuple[float, float, float] = 0.5,
    generator: torch.Generator | None = None,
    supersample: int = 1,
    need_depth: bool = False,
    chunk_cameras: int | None = None,
) -> RenderOutput:
    """Render ``field`` from every camera in ``cameras``: ``rgb [B, 3, H, W]``, ``opacity [B, 1, H, W]``.

    ``supersample=s`` renders ``sH x sW`` rays and average-pools them (anti-aliasing).
    ``generator`` switches to stratified (jittered) samples along each ray. ``background`` is a
    grey level, an RGB triple, or a ``[B, 3]`` tensor (one colour per camera).
    ``chunk_cameras`` bounds memory by rendering that many cameras at a time (same result).
    ``bound`` is the marching box: a half-size (the cube ``[-bound, bound]^3``) or a pair of corners
    ``(lo, hi)`` (e.g. a scene's tight :attr:`~carv.render.scenes.Scene.aabb`: fewer wasted samples).
    """
    width = height if width is None else width
    for name, v in (("height", height), ("width", width), ("supersample", supersample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples: expected a positive integer, got {n_samples!r}")
    _box(bound, cameras.position)  # validates
    B = len(cameras)
    if chunk_cameras is not None and chunk_cameras < B:
        bg = torch.as_tensor(background, dtype=cameras.dtype)
        outs = []
        for i in range(0, B, chunk_cameras):
            bgi = bg[i:i + chunk_cameras] if bg.ndim == 2 else bg
            outs.append(render(field, cameras[i:i + chunk_cameras], height, width, n_samples, bound, bgi,
                               generator, supersample, need_depth, None))
        return RenderOutput(torch.cat([o.rgb for o in outs]), torch.cat([o.opacity for o in outs]),
                            torch.cat([o.depth for o in outs]) if need_depth else None)
    H, W = height * supersample, width * supersample
    origins, dirs = cameras.rays(H, W)
    bg = _background(background, H * W, B, cameras.device, cameras.dtype)
    rgb, opacity, depth = render_rays(field, origins.reshape(-1, 3), dirs.reshape(-1, 3), n_samples, bound,
                                      bg, generator, need_depth)
    rgb = rgb.reshape(B, H, W, 3).permute(0, 3, 1, 2)
    opacity = opacity.reshape(B, 1, H, W)
    if depth is not None:
        depth = depth.reshape(B, 1, H, W)
    if supersample > 1:
        rgb = F.avg_pool2d(rgb, supersample)
        opacity = F.avg_pool2d(opacity, supersample)
        if depth is not None:
            depth = F.avg_pool2d(depth, supersample)
    return RenderOutput(rgb, opacity, depth)


class VoxelGrid(nn.Module):
    """A learnable dense density + colour grid over ``[-bound, bound]^3``.

    Parameters ``density [1, 1, D, D, D]`` and ``color [1, 3, D, D, D]`` hold raw (pre-activation)
    values, laid out ``[z, y, x]`` along the last three axes (``grid_sample``'s convention: the x
    coordinate indexes the last axis) with voxel centres on the box corners (``align_corners=True``).
    Calling the grid on points ``[..., 3]`` returns ``(density [...], rgb [...,3])``, so it is a
    field for :func:`render`. Points outside the box have zero density.

    ``density_activation``: ``"softplus"`` (default; ``scale * softplus(raw + bias)``), ``"exp"``
    (``scale * exp(raw + bias)``) or ``"relu"`` (``scale * relu(raw + bias)``; use with
    ``bias=0, scale=1`` to store densities directly, as :meth:`from_field` does).
    ``color_activation``: ``"sigmoid"`` (default) or ``"clamp"`` (to [0, 1], for stored colours).
    """

    def __init__(
        self,
        resolution: int = 64,
        bound: float = 1.0,
        density_activation: str = "softplus",
        density_bias: float = -6.0,
        density_scale: float = 10.0,
        color_activation: str = "sigmoid",
    ):
        super().__init__()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
            raise ValueError(f"resolution: expected an integer >= 2, got {resolution!r}")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound: expected a positive finite half-size of the box, got {bound!r}")
        if density_activation not in _DENSITY_ACTIVATIONS:
            raise ValueError(
                f"density_activation: expected one of {_DENSITY_ACTIVATIONS}, got {density_activation!r}"
            )
        if color_activation not in _COLOR_ACTIVATIONS:
            raise ValueError(f"color_activation: expected one of {_COLOR_ACTIVATIONS}, got {color_activation!r}")
        self.resolution = resolution
        self.bound = float(bound)
        self.density_activation = density_activation
        self.density_bias = float(density_bias)
        self.density_scale = float(density_scale)
        self.color_activation = color_activation
        D = resolution
        self.density = nn.Parameter(torch.zeros(1, 1, D, D, D))
        self.color = nn.Parameter(torch.zeros(1, 3, D, D, D))

    @property
    def voxel_size(self) -> float:
        return 2 * self.bound / (self.resolution - 1)

    def activate_density(self, raw: Tensor) -> Tensor:
        z = raw + self.density_bias
        if self.density_activation == "softplus":
            return self.density_scale * F.softplus(z)
        if self.density_activation == "exp":
            return self.density_scale * torch.exp(z)
        return self.density_scale * F.relu(z)

    def activate_color(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.color_activation == "sigmoid" else raw.clamp(0.0, 1.0)

    def raw_density(self, sigma: Tensor) -> Tensor:
        """The raw value whose activated density is ``sigma`` (the inverse of :meth:`activate_density`; ``sigma``
        must be > 0 for ``softplus`` and ``exp``), e.g. to write a known scene into the grid's parameters."""
        s = sigma / self.density_scale
        if self.density_activation == "softplus":  # softplus^-1(s) = log(expm1(s)), = s to float precision past 20
            z = torch.where(s > 20, s, torch.log(torch.expm1(s)))
        elif self.density_activation == "exp":
            z = torch.log(s)
        else:
            z = s
        return z - self.density_bias

    def raw_color(self, rgb: Tensor) -> Tensor:
        """The raw value whose activated colour is ``rgb`` (the inverse of :meth:`activate_color`; in (0, 1) for
        ``sigmoid``)."""
        return torch.log(rgb / (1 - rgb)) if self.color_activation == "sigmoid" else rgb

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        shape = points.shape[:-1]
        grid = (points / self.bound).reshape(1, 1, 1, -1, 3).to(self.density.dtype)
        volume = torch.cat([self.density, self.color], 1)
        raw = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        raw = raw.reshape(4, -1)
        inside = (points.reshape(-1, 3).abs() <= self.bound).all(-1)
        sigma = torch.where(inside, self.activate_density(raw[0]), 0.0).reshape(shape)
        rgb = self.activate_color(raw[1:].T).reshape(shape + (3,))
        return sigma, rgb

    def voxel_centers(self) -> Tensor:
        """World coordinates of the voxel centres, ``[D, D, D, 3]`` in the grid's ``[z, y, x]`` order."""
        c = torch.linspace(-self.bound, self.bound, self.resolution, dtype=self.density.dtype,
                           device=self.density.device)
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        return torch.stack([x, y, z], -1)

    @torch.no_grad()
    def add_blob_(self, radius: float = 0.5, peak: float = 10.0, center_z: float = 0.0,
                  height: float | None = None) -> VoxelGrid:
        """Add ``peak * (1 - rho)`` to the raw density where ``rho < 1``, with ``rho`` the ellipsoidal distance
        ``sqrt((x^2 + y^2) / radius^2 + (z - center_z)^2 / height^2)`` (a density "blob" that gives score
        distillation a starting shape; ``height=None``: ``radius``, a ball). Returns self."""
        h = radius if height is None else height
        c = self.voxel_centers()
        rho = ((c[..., 0] ** 2 + c[..., 1] ** 2) / radius ** 2 + (c[..., 2] - center_z) ** 2 / h ** 2).sqrt()
        self.density += (peak * (1 - rho)).clamp_min(0.0)[None, None]
        return self

    @staticmethod
    def resample_volume(volume: Tensor, resolution: int) -> Tensor:
        """A ``[1, C, D, D, D]`` volume of raw values trilinearly resampled to ``resolution^3`` with voxel centres on
        the box corners (``align_corners=True``, as :meth:`forward` reads it), so the corners keep their values."""
        return F.interpolate(volume, size=(resolution,) * 3, mode="trilinear", align_corners=True)

    @torch.no_grad()
    def upsampled(self, resolution: int) -> VoxelGrid:
        """A new grid at ``resolution^3`` (same box and activations) whose raw density and colour are this grid's
        trilinearly resampled (coarse-to-fine optimisation: the new grid renders almost like this one)."""
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
            raise ValueError(f"resolution: expected an integer >= 2, got {resolution!r}")
        new = VoxelGrid(resolution, self.bound, self.density_activation, self.density_bias, self.density_scale,
                        self.color_activation).to(self.density.device, self.density.dtype)
        new.density.copy_(self.resample_volume(self.density.detach(), resolution))
        new.color.copy_(self.resample_volume(self.color.detach(), resolution))
        return new

    def tv_loss(self) -> Tensor:
        """Mean squared difference of neighbouring raw densities (a smoothness regulariser)."""
        d = self.density
        return ((d[..., 1:, :, :] - d[..., :-1, :, :]) ** 2).mean() + \
            ((d[..., :, 1:, :] - d[..., :, :-1, :]) ** 2).mean() + \
            ((d[..., :, :, 1:] - d[..., :, :, :-1]) ** 2).mean()

    @classmethod
    @torch.no_grad()
    def from_field(cls, field: Field, resolution: int = 128, bound: float = 1.0,
                   chunk: int = 1 << 18) -> VoxelGrid:
        """Bake a field into a grid that stores density and colour directly (``relu``/``clamp``
        activations). Rendering the baked grid is much cheaper than evaluating an analytic field."""
        grid = cls(resolution, bound, density_activation="relu", density_bias=0.0, density_scale=1.0,
                   color_activation="clamp")
        pts = grid.voxel_centers().reshape(-1, 3)
        sig, col = [], []
        for i in range(0, pts.shape[0], chunk):
            s, c = field(pts[i:i + chunk])
            sig.append(s)
            col.append(c)
        D = resolution
        grid.density.copy_(torch.cat(sig).reshape(1, 1, D, D, D))
        grid.color.copy_(torch.cat(col).T.reshape(1, 3, D, D, D))
        return grid
