"""Secret randomness for DP-SGD: noise and Poisson sampling from a cryptographically secure source.

DP-SGD's guarantee rests on the noise and the batch sampling being unknown to whoever sees the
update. Seeding them from the job's config (or anything the coordinator chooses) would let a
coordinator that sends the same round twice subtract two releases and cancel the noise, so a
site draws them from :class:`SecureRandom`: a ChaCha20 keystream (the ``cryptography``
package's OpenSSL implementation) under a 256-bit key from ``os.urandom``, a new key for every
round. Gaussian noise is made from it by Box-Muller and, as in Opacus's ``secure_mode``, as the
sum of four draws divided by two, which defeats floating-point representation attacks
(Holohan & Braghin 2021, https://arxiv.org/abs/2107.10138).

:class:`SeededRandom` reproduces noise from a seed for debugging only; a site refuses it under
DP unless its own policy allows it (:func:`noise_source`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

SECURE = "csprng"
SEEDED = "seeded-debug"
_FLOAT24 = np.float32(2.0**-24)


class SeededNoiseRefused(PermissionError):
    """A DP job asked for reproducible (seeded) noise that this site's policy does not allow."""


class SecureRandom:
    """Uniform and Gaussian draws from a ChaCha20 keystream keyed by ``os.urandom``."""

    name = SECURE

    def __init__(self) -> None:
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(4) + os.urandom(12)), mode=None)
        self._stream = cipher.encryptor()

    def _words(self, count: int) -> np.ndarray:
        """``count`` uniformly random uint32 words."""
        return np.frombuffer(self._stream.update(bytes(4 * count)), dtype=np.uint32)

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 draws uniform on [0, 1) with 53 random bits each."""
        words = self._words(2 * count).astype(np.uint64).reshape(count, 2)
        bits = (words[:, 0] << np.uint64(21)) ^ (words[:, 1] >> np.uint64(11))
        return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)

    def _standard_normal(self, count: int) -> np.ndarray:
        """``count`` float32 standard normal draws (Box-Muller on 24-bit uniforms in (0, 1))."""
        half = (count + 1) // 2
        uniforms = (self._words(2 * half) >> np.uint32(8)).astype(np.float32).reshape(2, half)
        uniforms *= _FLOAT24
        uniforms += _FLOAT24 / 2  # never 0, so the logarithm is finite
        radius = np.log(uniforms[0])
        radius *= np.float32(-2.0)
        np.sqrt(radius, out=radius)
        angle = uniforms[1]
        angle *= np.float32(2.0 * np.pi)
        out = np.empty(2 * half, np.float32)
        np.cos(angle, out=out[:half])
        np.sin(angle, out=out[half:])
        out[:half] *= radius
        out[half:] *= radius
        return out[:count]

    def normal(self, count: int, std: float) -> torch.Tensor:
        """``count`` float32 draws of N(0, std^2): the sum of four normals over two."""
        total = self._standard_normal(count)
        for _ in range(3):
            total += self._standard_normal(count)
        total *= np.float32(std / 2.0)
        return torch.from_numpy(total)


class SeededRandom:
    """The same interface from a seeded torch generator: reproducible, NOT private."""

    name = SEEDED

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(int(seed))

    def uniform(self, count: int) -> torch.Tensor:
        return torch.rand(count, generator=self._generator, dtype=torch.float64)

    def normal(self, count: int, std: float) -> torch.Tensor:
        return torch.normal(0.0, std, (count,), generator=self._generator)


RandomSource = SecureRandom | SeededRandom


def noise_source(seeded_noise: bool, site_allows_seeded_noise: bool, seed: int) -> RandomSource:
    """The randomness of one DP-SGD round: secure unless the job asks for seeded noise and the
    site's own policy allows it; a seeded request the site does not allow is refused."""
    if not seeded_noise:
        return SecureRandom()
    if not site_allows_seeded_noise:
        raise SeededNoiseRefused(
            "the job sets privacy.debug_seeded_noise=true (DP-SGD noise and sampling reproducible "
            "from the job's seed, so a coordinator could cancel the noise): this site refuses it "
            "under DP; a site can allow it for debugging with its own governance."
            "allow_seeded_noise=true, and its rounds are then recorded as not private"
        )
    return SeededRandom(seed)


def fresh_seed() -> int:
    """A 32-bit seed (the range Lightning and numpy take) from the operating system's CSPRNG,
    for the draws DP does not rest on (augmentation)."""
    return secrets.randbits(32)


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus's Poisson batch sampler (each example joins a batch with probability
    ``sample_rate``), drawing its coins from a :data:`RandomSource`."""

    def __init__(
        self, *, num_samples: int, sample_rate: float, source: RandomSource, steps: int | None = None
    ) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.source = source

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.source.uniform(self.num_samples) < self.sample_rate
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()
