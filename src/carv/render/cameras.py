"""Pinhole cameras on a sphere around the origin, and the view labels the text-to-3D teacher uses.

Convention (the same as DreamFusion / threestudio):

- World up is ``+z``. Objects sit inside the box ``[-bound, bound]^3`` around the origin.
- Azimuth is measured in the ``xy`` plane from ``+x`` towards ``+y`` (counter-clockwise seen from
  above), in degrees, wrapped to ``(-180, 180]``. Elevation is the angle above the ``xy`` plane.
- A camera at azimuth ``az`` and elevation ``el`` sits at
  ``radius * (cos el cos az, cos el sin az, sin el)`` and looks at the origin, image "up" as close
  to world ``+z`` as possible.
- Objects face ``+x``: the camera at azimuth 0 sees the object's **front**, azimuth 180 its back,
  azimuth +-90 its sides. In the front view, world ``+y`` is on the image's right.
- Images are row-major ``[H, W]`` with row 0 at the top; pixel ``(i, j)`` has its centre at
  ``(j + 0.5, i + 0.5)`` in pixel units.

The text-to-3D teacher is conditioned on a coarse view label derived from azimuth only
(:func:`view_label`): ``0 = front`` (``|az| < 45``), ``2 = back`` (``|az| > 135``), else
``1 = side`` (both sides share one label, like DreamFusion's "side view" prompt).

Every random draw takes a ``torch.Generator``; no global RNG state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Cameras",
    "VIEW_NAMES",
    "DEFAULT_RADIUS",
    "DEFAULT_FOV_DEG",
    "DEFAULT_ELEVATION_RANGE",
    "random_cameras",
    "turntable_cameras",
    "cameras_from_angles",
    "view_label",
    "elevation_label",
]

VIEW_NAMES: tuple[str, ...] = ("front", "side", "back")
DEFAULT_RADIUS = 3.0
DEFAULT_FOV_DEG = 40.0
DEFAULT_ELEVATION_RANGE = (0.0, 40.0)
FRONT_HALF_WIDTH_DEG = 45.0
BACK_HALF_WIDTH_DEG = 45.0


def _finite_number(name: str, value, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not (lo_ok and hi_ok):
        lb = "-inf" if low is None else f"{low:g}"
        hb = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lb}, {hb}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return v


def _check_elevation(name: str, el: Tensor) -> None:
    if not torch.isfinite(el).all() or (el.abs() >= 90).any():
        raise ValueError(
            f"{name}: elevation must be finite and strictly between -90 and 90 degrees "
            f"(the look-at frame is undefined at the poles), got range "
            f"{el.min().item():g}..{el.max().item():g}"
        )


def wrap_degrees(az: Tensor) -> Tensor:
    """Wrap angles in degrees to ``(-180, 180]``."""
    w = torch.remainder(az + 180.0, 360.0) - 180.0
    return torch.where(w == -180.0, torch.full_like(w, 180.0), w)


def view_label(azimuth_deg: Tensor | float) -> Tensor:
    """Map azimuth (degrees, any range) to the teacher's view label: 0 front, 1 side, 2 back.

    ``|az| < 45`` is front, ``|az| > 135`` is back, everything else (both sides) is side.
    """
    az = wrap_degrees(torch.as_tensor(azimuth_deg, dtype=torch.float64)).abs()
    lab = torch.ones(az.shape, dtype=torch.long, device=az.device)
    lab = torch.where(az < FRONT_HALF_WIDTH_DEG, torch.zeros_like(lab), lab)
    return torch.where(az > 180.0 - BACK_HALF_WIDTH_DEG, torch.full_like(lab, 2), lab)


def elevation_label(elevation_deg: Tensor | float, edges: Sequence[float]) -> Tensor:
    """Map elevation (degrees) to a bin index of the increasing bin ``edges`` (``len(edges) - 1`` bins).

    Bin ``i`` holds ``edges[i] <= el < edges[i + 1]``; elevations outside ``[edges[0], edges[-1]]`` go to the
    nearest end bin (a camera just outside the teacher's training range gets its closest label).
    """
    e = [float(v) for v in edges]
    if len(e) < 2 or any(not math.isfinite(v) for v in e) or any(b <= a for a, b in zip(e, e[1:], strict=False)):
        raise ValueError(f"edges: expected at least 2 finite, strictly increasing elevations, got {edges!r}")
    el = torch.as_tensor(elevation_deg, dtype=torch.float64)
    inner = torch.tensor(e[1:-1], dtype=torch.float64, device=el.device)
    return torch.bucketize(el, inner, right=True).long()


@dataclass
class Cameras:
    """A batch of ``B`` look-at pinhole cameras.

    ``position [B, 3]`` camera centres; ``rotation [B, 3, 3]`` camera-to-world rotations whose
    columns are the camera's right, up and forward (viewing) axes in world coordinates;
    ``fov_deg`` the vertical field of view; ``azimuth_deg``/``elevation_deg [B]`` the angles that
    produced them (for view labels).
    """

    position: Tensor
    rotation: Tensor
    fov_deg: float
    azimuth_deg: Tensor
    elevation_deg: Tensor

    def __len__(self) -> int:
        return self.position.shape[0]

    @property
    def device(self) -> torch.device:
        return self.position.device

    @property
    def dtype(self) -> torch.dtype:
        return self.position.dtype

    @property
    def view_labels(self) -> Tensor:
        """The teacher's view label of each camera (``[B]`` long; 0 front, 1 side, 2 back)."""
        return view_label(self.azimuth_deg).to(self.device)

    def elevation_labels(self, edges: Sequence[float]) -> Tensor:
        """The elevation bin of each camera (``[B]`` long) for bin ``edges`` (:func:`elevation_label`)."""
        return elevation_label(self.elevation_deg, edges).to(self.device)

    def __getitem__(self, idx) -> Cameras:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return Cameras(self.position[idx], self.rotation[idx], self.fov_deg,
                       self.azimuth_deg[idx], self.elevation_deg[idx])

    def to(self, device=None, dtype=None) -> Cameras:
        return Cameras(self.position.to(device, dtype), self.rotation.to(device, dtype), self.fov_deg,
                       self.azimuth_deg.to(device, dtype), self.elevation_deg.to(device, dtype))

    def _focal(self, height: int) -> float:
        """Focal length in pixels for an image of ``height`` rows."""
        return 0.5 * height / math.tan(math.radians(self.fov_deg) / 2)

    def rays(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Ray origins and unit directions, each ``[B, H, W, 3]``, one ray through each pixel centre."""
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        f = self._focal(height)
        dev, dt = self.device, self.dtype
        x = (torch.arange(width, device=dev, dtype=dt) + 0.5 - width / 2) / f
        y = (height / 2 - torch.arange(height, device=dev, dtype=dt) - 0.5) / f
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        d_cam = torch.stack([xx, yy, torch.ones_like(xx)], -1)  # [H, W, 3] (right, up, forward)
        dirs = torch.einsum("bij,hwj->bhwi", self.rotation, d_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.position[:, None, None, :].expand_as(dirs)
        return origins, dirs

    def project(self, points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Project world points ``[B, N, 3]`` (or ``[N, 3]``, shared) to pixel coordinates.

        Returns ``(uv [B, N, 2], depth [B, N])`` where ``uv = (column, row)`` in continuous pixel units
        (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``) and depth is along the viewing axis.
        """
        if points.ndim == 2:
            points = points.expand(len(self), -1, -1)
        local = torch.einsum("bji,bnj->bni", self.rotation, points - self.position[:, None, :])
        f = self._focal(height)
        depth = local[..., 2]
        u = width / 2 + f * local[..., 0] / depth
        v = height / 2 - f * local[..., 1] / depth
        return torch.stack([u, v], -1), depth


def cameras_from_angles(
    azimuth_deg: Tensor | Sequence[float] | float,
    elevation_deg: Tensor | Sequence[float] | float,
    radius: float = DEFAULT_RADIUS,
    fov_deg: float = DEFAULT_FOV_DEG,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """Look-at cameras at the given azimuths/elevations (degrees; broadcast against each other)."""
    radius = _finite_number("radius", radius, 0.0, None, low_open=True)
    fov_deg = _finite_number("fov_deg", fov_deg, 0.0, 180.0, low_open=True, high_open=True)
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64).reshape(-1)
    el = torch.as_tensor(elevation_deg, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(az).all():
        raise ValueError(f"azimuth_deg: expected finite angles, got {az.tolist()}")
    _check_elevation("elevation_deg", el)
    az, el = torch.broadcast_tensors(az, el)
    az = wrap_degrees(az)
    a, e = torch.deg2rad(az), torch.deg2rad(el)
    pos = radius * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], -1)
    forward = -pos / pos.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(forward)
    right = torch.linalg.cross(forward, up)
    right = right / right.norm(dim=-1, keepdim=True)
    cam_up = torch.linalg.cross(right, forward)
    rot = torch.stack([right, cam_up, forward], -1)  # columns: right, up, forward
    return Cameras(pos.to(device, dtype), rot.to(device, dtype), fov_deg,
                   az.to(device, dtype), el.to(device, dtype))


def random_cameras(
    n: int,
    generator: torch.Generator,
    elevation_range: tuple[float, float] = DEFAULT_ELEVATION_RANGE,
    radius: float = DEFAULT_RADIUS,
    fov_deg: float = DEFAULT_FOV_DEG,
    azimuth_range: tuple[float, float] = (-180.0, 180.0),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """``n`` cameras with azimuth uniform in ``azimuth_range`` (default all 360 degrees) and
    elevation uniform in ``elevation_range`` (degrees), drawn with ``generator`` (on its device)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer number of cameras, got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    u = torch.rand(2, n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    return cameras_from_unit(u.T, elevation_range, radius, fov_deg, azimuth_range, device, dtype)


def cameras_from_unit(
    u: Tensor,
    elevation_range: tuple[float, float] = DEFAULT_ELEVATION_RANGE,
    radius: float = DEFAULT_RADIUS,
    fov_deg: float = DEFAULT_FOV_DEG,
    azimuth_range: tuple[float, float] = (-180.0, 180.0),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """Cameras from unit points ``u [n, 2]`` in ``[0, 1)``: azimuth ``lo + (hi - lo) u[:, 0]`` and elevation
    ``lo + (hi - lo) u[:, 1]`` (uniform ``u`` gives :func:`random_cameras`' distribution; strata or a
    lattice of ``u`` from :mod:`carv.upstream` spread the cameras while keeping each one uniform)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    if u.ndim != 2 or u.shape[1] != 2 or u.shape[0] < 1:
        raise ValueError(f"u: expected shape [n, 2] with n >= 1, got {tuple(u.shape)}")
    if not bool(((u >= 0) & (u <= 1)).all()):
        raise ValueError("u: expected unit points in [0, 1]")
    lo, hi = _range("elevation_range", elevation_range)
    if lo <= -90 or hi >= 90:
        raise ValueError(
            f"elevation_range: both ends must lie strictly between -90 and 90 degrees, got {elevation_range!r}"
        )
    alo, ahi = _range("azimuth_range", azimuth_range)
    u = u.cpu()
    az = alo + (ahi - alo) * u[:, 0]
    el = lo + (hi - lo) * u[:, 1]
    return cameras_from_angles(az, el, radius, fov_deg, device, dtype)


def turntable_cameras(
    n: int,
    elevation_deg: float = 15.0,
    radius: float = DEFAULT_RADIUS,
    fov_deg: float = DEFAULT_FOV_DEG,
    start_azimuth_deg: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Cameras:
    """``n`` cameras at evenly spaced azimuths ``start + 360 k / n`` and a fixed elevation."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer number of cameras, got {n!r}")
    elevation_deg = _finite_number("elevation_deg", elevation_deg, -90.0, 90.0, True, True)
    start = _finite_number("start_azimuth_deg", start_azimuth_deg)
    az = start + 360.0 * torch.arange(n, dtype=torch.float64) / n
    return cameras_from_angles(az, elevation_deg, radius, fov_deg, device, dtype)


def _range(name: str, r) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair (low, high) of numbers, got {r!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"{name}: expected finite low <= high, got {r!r}")
    return lo, hi
