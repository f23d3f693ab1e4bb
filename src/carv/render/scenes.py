"""Procedural scenes for text-to-3D: analytic density + colour fields keyed by a prompt.

Each scene is a union of primitives (spheres, ellipsoids, boxes, capsules, cylinders, cones and
frusta along any axis), each with an albedo. A primitive is a signed distance function ``d(p)``
(exact or a conservative bound); the scene's distance is the minimum over primitives and

- density ``sigma(p) = sigma_max * sigmoid(-d(p) / softness)`` (a solid with a soft skin about
  ``softness`` thick, so renders are anti-aliased and a 64^3 voxel grid can represent it),
- colour = albedo of the nearest primitive, shaded by a fixed *world-space* light:
  ``albedo * (0.45 + 0.1 n_z + 0.5 max(0, n . l))`` with ``n`` the distance-field gradient. The
  shading is baked into a view-independent colour, so a density + colour voxel grid can reproduce
  the ground truth exactly (fair PSNR / mask IoU), and the shapes still read as 3D.

All scenes use the camera convention of :mod:`carv.render.cameras`: ``+z`` up, the object's front
faces ``+x`` (azimuth 0), and it sits inside a ball of radius 0.95 around the origin (so every
view of the default cameras frames it). Most scenes are clearly asymmetric front/back (the duck's beak and the snowman's
nose point to ``+x``, the chair's backrest is at ``-x``, the lamp's shade leans to the front, the
mushroom's spots, the tree's baubles and the table's drawer are on the front); the traffic cone is
symmetric like the real thing. Every scene's shape and albedo are mirror-symmetric in ``y`` (left/right),
but the light (:data:`LIGHT_DIRECTION`, from front-right-top) is not, so a horizontally flipped render from
azimuth ``az`` is the render from ``-az`` with the light from the other side (mean absolute difference
0.01-0.05 in ``[-1, 1]`` units at azimuth 30, elevation 20), not the same image.

:data:`SCENES` maps prompts to scenes (its order defines the teacher's prompt labels);
:func:`get_scene` accepts case and whitespace variations and raises ``ValueError`` listing the
allowed prompts otherwise. Render a scene with :func:`carv.render.volume.render`, or quickly with
:meth:`Scene.bake` (a 128^3 grid; rendering it is ~20x cheaper than evaluating primitives).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from carv.render.cameras import Cameras
from carv.render.volume import RenderOutput, VoxelGrid, render

__all__ = ["Primitive", "Scene", "SCENES", "PROMPTS", "get_scene", "normalize_prompt", "prompt_index",
           "LIGHT_DIRECTION"]

Vec = Sequence[float]
LIGHT_DIRECTION = (0.6, 0.35, 0.72)  # from front-right-top (unnormalised)


def _v(x: Vec, like: Tensor) -> Tensor:
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def _length(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


@dataclass(frozen=True)
class Primitive:
    """One solid: ``kind`` in {sphere, ellipsoid, box, capsule, frustum}, its parameters, an albedo.

    - ``sphere``: ``center, radius``
    - ``ellipsoid``: ``center, radii`` (axis-aligned)
    - ``box``: ``center, half`` (axis-aligned half sizes), optional ``rounding``
    - ``capsule``: segment ``a -> b`` with ``radius``
    - ``frustum``: capped cone/cylinder along ``a -> b``, radius ``ra`` at ``a`` and ``rb`` at ``b``
      (``ra == rb`` is a cylinder, ``rb == 0`` a cone)

    ``cut_below``: optional ``z`` under which the primitive is removed (e.g. a mushroom cap).
    """

    kind: str
    params: dict
    albedo: tuple[float, float, float]
    cut_below: float | None = None

    def sdf(self, p: Tensor) -> Tensor:
        k, q = self.kind, self.params
        if k == "sphere":
            d = _length(p - _v(q["center"], p)) - q["radius"]
        elif k == "ellipsoid":
            r = _v(q["radii"], p)
            x = p - _v(q["center"], p)
            k0 = _length(x / r)
            k1 = _length(x / (r * r)).clamp_min(1e-9)
            d = k0 * (k0 - 1.0) / k1
        elif k == "box":
            x = (p - _v(q["center"], p)).abs() - _v(q["half"], p) + q.get("rounding", 0.0)
            d = _length(x.clamp_min(0.0)) + x.amax(-1).clamp_max(0.0) - q.get("rounding", 0.0)
        elif k == "capsule":
            a, b = _v(q["a"], p), _v(q["b"], p)
            ba = b - a
            h = (((p - a) * ba).sum(-1) / (ba * ba).sum()).clamp(0.0, 1.0)
            d = _length(p - a - h[..., None] * ba) - q["radius"]
        elif k == "frustum":
            a, b = _v(q["a"], p), _v(q["b"], p)
            ra, rb = float(q["ra"]), float(q["rb"])
            axis = b - a
            L = float(_length(axis))
            u = axis / L
            x = p - a
            h = (x * u).sum(-1)
            radial = _length(x - h[..., None] * u)
            r_at = ra + (rb - ra) * (h / L).clamp(0.0, 1.0)
            cos = L / math.hypot(L, ra - rb)
            d = torch.maximum((radial - r_at) * cos, torch.maximum(-h, h - L))
        else:
            raise ValueError(f"kind: unknown primitive {k!r}; allowed: sphere, ellipsoid, box, capsule, frustum")
        if self.cut_below is not None:
            d = torch.maximum(d, self.cut_below - p[..., 2])
        return d


def sphere(c: Vec, r: float, albedo, **kw) -> Primitive:
    return Primitive("sphere", {"center": tuple(c), "radius": r}, tuple(albedo), **kw)


def ellipsoid(c: Vec, radii: Vec, albedo, **kw) -> Primitive:
    return Primitive("ellipsoid", {"center": tuple(c), "radii": tuple(radii)}, tuple(albedo), **kw)


def box(c: Vec, half: Vec, albedo, rounding: float = 0.0, **kw) -> Primitive:
    return Primitive("box", {"center": tuple(c), "half": tuple(half), "rounding": rounding}, tuple(albedo), **kw)


def capsule(a: Vec, b: Vec, r: float, albedo, **kw) -> Primitive:
    return Primitive("capsule", {"a": tuple(a), "b": tuple(b), "radius": r}, tuple(albedo), **kw)


def frustum(a: Vec, b: Vec, ra: float, rb: float, albedo, **kw) -> Primitive:
    return Primitive("frustum", {"a": tuple(a), "b": tuple(b), "ra": ra, "rb": rb}, tuple(albedo), **kw)


@dataclass
class Scene:
    """A prompt and its primitives; calling it on points ``[..., 3]`` gives ``(density, rgb)``.

    ``front_point``: a surface point on the object's front (visible from azimuth 0, hidden from
    azimuth 180), or None for front/back-symmetric scenes; used by tests of the view convention.
    """

    prompt: str
    primitives: list[Primitive]
    front_point: tuple[float, float, float] | None = None
    sigma_max: float = 60.0
    softness: float = 0.015
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def sdf_all(self, p: Tensor) -> Tensor:
        """Distance of each point to each primitive, ``[P, ...]``."""
        return torch.stack([prim.sdf(p) for prim in self.primitives])

    def sdf(self, p: Tensor) -> Tensor:
        return self.sdf_all(p).amin(0)

    def __call__(self, points: Tensor) -> tuple[Tensor, Tensor]:
        shape = points.shape[:-1]
        p = points.reshape(-1, 3)
        d_all = self.sdf_all(p)
        d, idx = d_all.min(0)
        sigma = self.sigma_max * torch.sigmoid(-d / self.softness)
        albedo = torch.tensor([prim.albedo for prim in self.primitives], dtype=p.dtype, device=p.device)[idx]
        # shade only near the surface (elsewhere the density is negligible)
        near = (d < 6 * self.softness).nonzero().squeeze(-1)
        shade = torch.ones_like(d)
        if near.numel():
            pn = p[near]
            h = 2e-3
            offs = h * torch.eye(3, dtype=p.dtype, device=p.device)
            grad = torch.stack([self.sdf(pn + offs[i]) - self.sdf(pn - offs[i]) for i in range(3)], -1)
            n = grad / _length(grad)[..., None].clamp_min(1e-12)
            light = _v(LIGHT_DIRECTION, p)
            light = light / _length(light)
            s = 0.45 + 0.1 * n[:, 2] + 0.5 * (n @ light).clamp_min(0.0)
            shade = shade.index_put((near,), s)
        rgb = (albedo * shade[:, None]).clamp(0.0, 1.0)
        return sigma.reshape(shape), rgb.reshape(shape + (3,))

    @property
    def aabb(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """A tight axis-aligned box ``(lo, hi)`` around the solid (skin included), inside ``[-1, 1]^3``.

        Pass it as ``bound=`` to :func:`~carv.render.volume.render` to march fewer empty samples."""
        if "aabb" not in self._cache:
            n = 48
            c = torch.linspace(-1.0, 1.0, n)
            p = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
            inside = p[self.sdf(p) < 4 * self.softness]
            pad = 2.0 / (n - 1) + 2 * self.softness
            lo = (inside.amin(0) - pad).clamp(-1.0, 1.0)
            hi = (inside.amax(0) + pad).clamp(-1.0, 1.0)
            self._cache["aabb"] = (tuple(lo.tolist()), tuple(hi.tolist()))
        return self._cache["aabb"]

    def bake(self, resolution: int = 128, bound: float = 1.0) -> VoxelGrid:
        """The scene sampled on a ``resolution^3`` grid (cached per resolution), for fast rendering."""
        key = ("bake", resolution, bound)
        if key not in self._cache:
            self._cache[key] = VoxelGrid.from_field(self, resolution, bound).requires_grad_(False)
        return self._cache[key]

    def render(self, cameras: Cameras, height: int, width: int | None = None, *, baked: bool = False,
               **kwargs) -> RenderOutput:
        """Ground-truth render (analytic field, or its 128^3 bake with ``baked=True``); keyword
        arguments go to :func:`carv.render.volume.render` (``n_samples``, ``background``, ...)."""
        with torch.no_grad():
            f = self
            if baked:
                f = self.bake()
                if f.density.device != cameras.device or f.density.dtype != cameras.dtype:
                    f = copy.deepcopy(f).to(cameras.device, cameras.dtype)
            return render(f, cameras, height, width, **kwargs)


# --------------------------------------------------------------------------- palette
WHITE = (0.95, 0.95, 0.96)
CREAM = (0.93, 0.89, 0.78)
BLACK = (0.06, 0.06, 0.07)
RED = (0.86, 0.1, 0.1)
ORANGE = (1.0, 0.48, 0.05)
YELLOW = (1.0, 0.86, 0.12)
GREEN = (0.12, 0.62, 0.18)
BROWN = (0.45, 0.27, 0.12)
BLUE = (0.15, 0.32, 0.88)
PURPLE = (0.58, 0.2, 0.78)
FLOOR = -0.75


def _on_ellipsoid(c: Vec, radii: Vec, az_deg: float, polar_deg: float) -> tuple[float, float, float]:
    a, t = math.radians(az_deg), math.radians(polar_deg)
    return (c[0] + radii[0] * math.sin(t) * math.cos(a), c[1] + radii[1] * math.sin(t) * math.sin(a),
            c[2] + radii[2] * math.cos(t))


def _mushroom() -> Scene:
    cap_c, cap_r = (0.0, 0.0, 0.0), (0.75, 0.75, 0.55)
    prims = [
        frustum((0, 0, FLOOR), (0, 0, 0.02), 0.22, 0.16, CREAM),
        ellipsoid(cap_c, cap_r, RED, cut_below=0.0),
    ]
    for az, pol in [(0, 35), (35, 55), (-35, 55), (0, 70), (60, 35), (-60, 35), (75, 70), (-75, 70)]:
        prims.append(sphere(_on_ellipsoid(cap_c, cap_r, az, pol), 0.1, WHITE, cut_below=0.0))
    spot = _on_ellipsoid(cap_c, cap_r, 0, 35)
    normal = torch.tensor([(spot[i] - cap_c[i]) / cap_r[i] ** 2 for i in range(3)])
    normal = normal / normal.norm()
    return Scene("a red mushroom", prims, front_point=tuple((torch.tensor(spot) + 0.1 * normal).tolist()))


def _table() -> Scene:
    top_blue, leg_blue, drawer_blue = BLUE, (0.1, 0.2, 0.6), (0.4, 0.55, 0.98)
    top = 0.2  # the table stands on z = -0.55 so that its corners stay inside the unit ball
    prims = [box((0, 0, top), (0.5, 0.72, 0.05), top_blue, rounding=0.01)]
    for x in (-0.38, 0.38):
        for y in (-0.56, 0.56):
            prims.append(frustum((x, y, -0.55), (x, y, top - 0.03), 0.06, 0.06, leg_blue))
    prims += [
        box((0.42, 0.0, top - 0.13), (0.06, 0.32, 0.09), drawer_blue),
        sphere((0.5, 0.0, top - 0.13), 0.05, YELLOW),
    ]
    return Scene("a blue table", prims, front_point=(0.48, 0.2, top - 0.13))


def _snowman() -> Scene:
    prims = [
        sphere((0, 0, -0.43), 0.36, WHITE),
        sphere((0, 0, 0.05), 0.27, WHITE),
        sphere((0, 0, 0.42), 0.2, WHITE),
        frustum((0.15, 0, 0.42), (0.45, 0, 0.39), 0.055, 0.0, ORANGE),
        sphere((0.16, 0.08, 0.5), 0.035, BLACK),
        sphere((0.16, -0.08, 0.5), 0.035, BLACK),
        sphere((0.265, 0, 0.12), 0.04, BLACK),
        sphere((0.27, 0, 0.0), 0.04, BLACK),
        sphere((0.3, 0, -0.3), 0.045, BLACK),
        frustum((0, 0, 0.56), (0, 0, 0.6), 0.24, 0.24, BLACK),
        frustum((0, 0, 0.6), (0, 0, 0.86), 0.14, 0.14, BLACK),
        frustum((0, 0, 0.6), (0, 0, 0.66), 0.145, 0.145, RED),
        capsule((0, 0.22, 0.1), (0.05, 0.58, 0.32), 0.035, BROWN),
        capsule((0, -0.22, 0.1), (0.05, -0.58, 0.32), 0.035, BROWN),
    ]
    return Scene("a snowman", prims, front_point=(0.45, 0.0, 0.39))


def _duck() -> Scene:
    prims = [
        ellipsoid((-0.05, 0, -0.42), (0.6, 0.45, 0.33), YELLOW),
        frustum((-0.45, 0, -0.4), (-0.72, 0, -0.08), 0.22, 0.03, YELLOW),
        sphere((0.3, 0, 0.12), 0.3, YELLOW),
        ellipsoid((0.62, 0, 0.07), (0.17, 0.13, 0.055), ORANGE),
        sphere((0.5, 0.14, 0.25), 0.05, BLACK),
        sphere((0.5, -0.14, 0.25), 0.05, BLACK),
        ellipsoid((-0.08, 0.42, -0.32), (0.3, 0.07, 0.15), (0.95, 0.72, 0.05)),
        ellipsoid((-0.08, -0.42, -0.32), (0.3, 0.07, 0.15), (0.95, 0.72, 0.05)),
    ]
    return Scene("a yellow rubber duck", prims, front_point=(0.79, 0.0, 0.07))


def _tree() -> Scene:
    prims = [
        frustum((0, 0, FLOOR), (0, 0, -0.3), 0.11, 0.09, BROWN),
        frustum((0, 0, -0.38), (0, 0, 0.15), 0.62, 0.1, GREEN),
        frustum((0, 0, -0.08), (0, 0, 0.48), 0.48, 0.05, GREEN),
        frustum((0, 0, 0.22), (0, 0, 0.88), 0.36, 0.0, GREEN),
    ]
    # red baubles on the front half, a yellow one on each side (mirror-symmetric in y like every scene)
    baubles = [(-0.25, 0.52, 0.0), (-0.02, 0.37, 35.0), (-0.02, 0.37, -35.0), (0.2, 0.3, 0.0),
               (0.42, 0.19, 25.0), (0.42, 0.19, -25.0)]
    for z, r, az in baubles:
        a = math.radians(az)
        prims.append(sphere((r * math.cos(a), r * math.sin(a), z), 0.07, RED))
    prims += [sphere((0.0, 0.42, -0.22), 0.07, YELLOW), sphere((0.0, -0.42, -0.22), 0.07, YELLOW)]
    return Scene("a green tree", prims, front_point=(0.45, 0.0, -0.05))


def _traffic_cone() -> Scene:
    z0, z1, r0, r1 = -0.58, 0.85, 0.4, 0.06

    def r_at(z: float) -> float:  # radius of the orange cone at height z
        return r0 + (r1 - r0) * (z - z0) / (z1 - z0)

    prims = [
        box((0, 0, -0.61), (0.42, 0.42, 0.04), BLACK, rounding=0.02),
        frustum((0, 0, z0), (0, 0, z1), r0, r1, ORANGE),
    ]
    for a, b in [(-0.1, 0.05), (0.3, 0.42)]:
        prims.append(frustum((0, 0, a), (0, 0, b), r_at(a) + 0.012, r_at(b) + 0.012, WHITE))
    return Scene("an orange traffic cone", prims, front_point=None)


def _chair() -> Scene:
    dark = (0.36, 0.12, 0.5)
    prims = [
        box((0, 0, -0.12), (0.42, 0.42, 0.05), PURPLE, rounding=0.01),
        box((0.03, 0, -0.045), (0.36, 0.36, 0.03), (0.75, 0.5, 0.88), rounding=0.02),
        box((-0.38, 0, 0.31), (0.04, 0.42, 0.36), PURPLE, rounding=0.01),
    ]
    for x in (-0.36, 0.36):
        for y in (-0.36, 0.36):
            prims.append(frustum((x, y, FLOOR), (x, y, -0.15), 0.05, 0.05, dark))
    return Scene("a purple chair", prims, front_point=(0.42, 0.0, -0.12))


def _lamp() -> Scene:
    pole = (0.78, 0.78, 0.8)
    prims = [
        frustum((-0.15, 0, FLOOR), (-0.15, 0, -0.64), 0.34, 0.3, WHITE),
        capsule((-0.2, 0, -0.65), (-0.2, 0, 0.35), 0.045, pole),
        capsule((-0.2, 0, 0.35), (0.28, 0, 0.58), 0.04, pole),
        frustum((0.26, 0, 0.6), (0.55, 0, 0.18), 0.1, 0.34, WHITE),
        sphere((0.56, 0, 0.15), 0.12, (1.0, 0.9, 0.45)),
        box((0.12, 0.0, -0.62), (0.05, 0.05, 0.03), BLACK),
    ]
    return Scene("a white lamp", prims, front_point=(0.68, 0.0, 0.15))


def _build() -> dict[str, Scene]:
    scenes = [_mushroom(), _table(), _snowman(), _duck(), _tree(), _traffic_cone(), _chair(), _lamp()]
    return {s.prompt: s for s in scenes}


SCENES: dict[str, Scene] = _build()
PROMPTS: tuple[str, ...] = tuple(SCENES)


def normalize_prompt(prompt: str) -> str:
    """Lower-case and collapse whitespace (``"  A  Snowman "`` -> ``"a snowman"``)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
    return " ".join(prompt.lower().split())


def find_scene(prompt: str) -> Scene | None:
    """The scene for ``prompt`` (case/whitespace-insensitive), or None when no procedural scene has it."""
    return SCENES.get(normalize_prompt(prompt))


def get_scene(prompt: str) -> Scene:
    """The scene for ``prompt`` (case/whitespace-insensitive); ValueError listing the prompts otherwise."""
    key = normalize_prompt(prompt)
    if key not in SCENES:
        raise ValueError(f"prompt: no procedural scene for {prompt!r}; allowed prompts: {list(PROMPTS)}")
    return SCENES[key]


def prompt_index(prompt: str) -> int:
    """Position of ``prompt`` in :data:`PROMPTS` (the teacher's prompt label)."""
    get_scene(prompt)
    return PROMPTS.index(normalize_prompt(prompt))
