"""Random sources: seeded generators for reproducible runs, and the OS's
cryptographic source for ``secure`` noise.

All seeded randomness of a run derives from one integer seed, split into
independent streams by a purpose label (and rank), so that e.g. the sampler and
the noise never share a generator and resuming one does not perturb the other.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets

import numpy as np
import torch


def fresh_seed() -> int:
    """A seed from the OS's cryptographic source (used when the config gives none)."""
    return secrets.randbits(63)


def derive_seed(seed: int, purpose: str, rank: int = 0) -> int:
    """A 63-bit seed for one stream, e.g. ``derive_seed(seed, "noise")``."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_generator(
    seed: int, purpose: str, rank: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A torch generator on ``device`` for one purpose of a seeded run."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, purpose, rank))
    return gen


def standard_normal(
    shape: torch.Size | tuple[int, ...],
    *,
    generator: torch.Generator | None,
    device: str | torch.device = "cpu",
    secure: bool = False,
) -> torch.Tensor:
    """float32 N(0, 1) samples of ``shape``.

    Every noise mechanism draws through this function, one call per parameter in
    the order of the gradient dict, so that mechanisms that should coincide (e.g.
    BandMF with one band and Gaussian) are bit-identical for the same seed.

    ``secure=True`` ignores ``generator`` and turns bytes from ``os.urandom`` into
    normals with the Box-Muller transform in float64 (no torchcsprng needed). It is
    slow for large models; that is the price of a cryptographic source.
    """
    if not secure:
        if generator is not None and torch.device(device).type != generator.device.type:
            # the model moved to another device after its generator was made (e.g. .cuda()
            # after make_private): draw on the generator's device, same stream, then move
            out = torch.randn(shape, generator=generator, device=generator.device)
            return out.to(device)
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # 53-bit uniforms in (0, 1]; u1 > 0 keeps log finite
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return torch.from_numpy(z.astype(np.float32)).reshape(shape).to(device)
