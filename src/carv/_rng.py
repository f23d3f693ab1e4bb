"""Random-generator plumbing shared by every sampling module.

carv never touches torch's global RNG: each random call takes a ``torch.Generator``, a seed, or
``None`` (a fresh generator seeded from the OS, so results are random but no global state moves).
"""

from __future__ import annotations

import torch

__all__ = ["as_generator"]


def as_generator(generator: torch.Generator | int | None, device: torch.device | str | None = None,
                 name: str = "generator") -> torch.Generator:
    device = torch.device(device if device is not None else "cpu")
    if isinstance(generator, torch.Generator):
        if generator.device.type != device.type:
            raise ValueError(
                f"{name}: generator lives on {generator.device.type!r} but the draws are made on "
                f"{device.type!r}; pass a torch.Generator(device={device.type!r}) or an int seed"
            )
        return generator
    g = torch.Generator(device=device)
    if generator is None:
        g.seed()
    elif isinstance(generator, int) and not isinstance(generator, bool):
        g.manual_seed(generator)
    else:
        raise TypeError(f"{name}: expected a torch.Generator, an int seed or None, got {type(generator).__name__}")
    return g
