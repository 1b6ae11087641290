"""``ClassPool``: all images of one split, as one uint8 tensor, plus a synthetic pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClassPool:
    """The classes of one split.

    ``images[c, d]`` is drawing ``d`` of class ``c`` (uint8): ``[H, W]`` for a grey-scale pool (bright
    strokes on a dark background for Omniglot) or ``[channels, H, W]`` for a colour one (mini-ImageNet);
    only the first ``counts[c]`` drawings of class ``c`` are valid, the rest is zero padding.
    ``names[c]`` identifies the class, e.g. ``"Latin/character01@rot90"``.
    ``rotations`` are the angles (multiples of 90 degrees, counter-clockwise) a sampler draws
    from, one per class and task (MAML's rotation semantics); ``(0,)``: no rotation.
    """

    images: torch.Tensor  # uint8 [num_classes, max_drawings, H, W] or [num_classes, max_drawings, channels, H, W]
    counts: torch.Tensor  # long [num_classes]
    names: list[str] = field(default_factory=list)
    rotations: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() not in (4, 5):
            raise ValueError(
                f"ClassPool.images must be uint8 [classes, drawings, H, W] or [classes, drawings, channels, H, W], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.counts.dtype != torch.long or self.counts.shape != (self.images.shape[0],):
            raise ValueError(
                f"ClassPool.counts must be long [{self.images.shape[0]}], "
                f"got {self.counts.dtype} {tuple(self.counts.shape)}"
            )
        rotations = tuple(self.rotations)
        if not rotations or len(set(rotations)) != len(rotations) or any(r % 90 for r in rotations):
            raise ValueError(f"ClassPool.rotations must be distinct multiples of 90, got {self.rotations!r}")
        object.__setattr__(self, "rotations", rotations)
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"{len(self.names)} names for {self.images.shape[0]} classes")
        if self.images.shape[0] > 0:
            lo, hi = int(self.counts.min()), int(self.counts.max())
            if lo < 1 or hi > self.images.shape[1]:
                raise ValueError(
                    f"ClassPool.counts must lie in [1, {self.images.shape[1]}], got [{lo}, {hi}]"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return int(self.images.shape[0])

    @property
    def max_drawings(self) -> int:
        """Padded number of drawings per class."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sampled image (one channel for a 4-dimensional ``images``)."""
        if self.images.dim() == 4:
            return (1, int(self.images.shape[2]), int(self.images.shape[3]))
        return tuple(int(n) for n in self.images.shape[2:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        """Device of the image tensor."""
        return self.images.device

    def to(self, device: torch.device | str) -> ClassPool:
        """Return a copy of the pool on ``device``."""
        return ClassPool(self.images.to(device), self.counts.to(device), list(self.names), self.rotations)

    def subset(self, indices: list[int] | torch.Tensor) -> ClassPool:
        """Return the pool restricted to the given class indices (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        names = [self.names[i] for i in idx.tolist()]
        idx = idx.to(self.images.device)
        return ClassPool(self.images[idx], self.counts[idx], names, self.rotations)


def synthetic_pool(
    num_classes: int, drawings: int, image_size: int = 28, seed: int = 0, channels: int = 1
) -> ClassPool:
    """A tiny learnable in-memory pool for tests, smoke runs and timing runs of a real data set's shape.

    Each class is a fixed random blob pattern (a random 7x7 binary grid upsampled to
    ``image_size``); each drawing is that pattern with a random intensity and additive
    noise, so a classifier can learn it. Deterministic in ``seed``. ``channels=1`` gives a grey-scale pool
    (``[classes, drawings, H, W]``); more channels a colour one (``[classes, drawings, channels, H, W]``, e.g. 3 at
    84 pixels for mini-ImageNet's shape), each channel with its own pattern.
    """
    for name, value in (("num_classes", num_classes), ("drawings", drawings),
                        ("image_size", image_size), ("channels", channels)):
        if int(value) < 1:
            raise ValueError(f"synthetic_pool: {name} must be positive, got {value}")
    g = torch.Generator().manual_seed(int(seed))
    names = [f"synthetic/class{c:04d}" for c in range(num_classes)]
    counts = torch.full((num_classes,), drawings, dtype=torch.long)
    if channels > 1:
        return ClassPool(_colour_synthetic_images(num_classes, drawings, image_size, channels, g), counts, names)
    grid = (torch.rand(num_classes, 1, 7, 7, generator=g) < 0.4).float()
    protos = F.interpolate(grid, size=(image_size, image_size), mode="nearest")
    gain = 0.6 + 0.4 * torch.rand(num_classes, drawings, 1, 1, generator=g)
    noise = 0.25 * torch.rand(num_classes, drawings, image_size, image_size, generator=g)
    x = (protos * gain + noise)  # [C, 1, H, W] broadcasts over drawings.clamp(0, 1)
    images = (x * 255).round().to(torch.uint8)
    return ClassPool(images, counts, names)


def _colour_synthetic_images(
    num_classes: int, drawings: int, image_size: int, channels: int, g: torch.Generator
) -> torch.Tensor:
    """uint8 ``[classes, drawings, channels, H, W]``: one blob pattern per class and channel, a random intensity per
    drawing and uniform noise, built one class at a time (a mini-ImageNet-sized pool has 64 x 600 84x84x3 images)."""
    grid = (torch.rand(num_classes, channels, 7, 7, generator=g) < 0.4).float()
    protos = F.interpolate(grid, size=(image_size, image_size), mode="nearest")
    images = torch.empty(num_classes, drawings, channels, image_size, image_size, dtype=torch.uint8)
    for c in range(num_classes):
        gain = 0.6 + 0.4 * torch.rand(drawings, 1, 1, 1, generator=g)
        noise = 0.25 * torch.rand(drawings, channels, image_size, image_size, generator=g)
        images[c] = ((protos[c] * gain + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return images
