"""Tiled and sliced VAE encode/decode, so that a clip's (or a large image's) peak memory follows
the tile and not the frame: caching latents (``ldm-data encode``), online encoding in training,
previews and ``ldm-sample`` all run the VAE this way when it is set."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from train.errors import ConfigError
from train.models.parts import vae_scale_factor


@dataclass(frozen=True)
class VaeTiling:
    """diffusers' own tiling (``enable_tiling``: overlapping spatial tiles, blended) and slicing
    (``enable_slicing``: one sample of a batch at a time). ``tile``: frames wider or taller than
    this many pixels are cut into tiles of this side; ``stride``: pixels between tile starts
    (``tile - stride`` overlap, blended; default three quarters of the tile). Both must be
    multiples of the VAE's downsampling, or the latent tiles would not line up with the pixel
    ones. Video VAEs (Wan, LTX, CogVideoX) also decode time causally, a latent frame at a time,
    whatever this says."""

    tile: int = 256
    stride: int | None = None
    slicing: bool = True

    def __post_init__(self) -> None:
        if self.tile <= 0 or (self.stride is not None and not 0 < self.stride <= self.tile):
            raise ConfigError(
                f"model.vae_tiling: tile={self.tile}, stride={self.stride}; the stride must be "
                "positive and at most the tile (their difference is the blended overlap)"
            )

    def stride_for(self, factor: int) -> int:
        """The stride in pixels for a VAE that downsamples ``factor`` times."""
        stride = self.stride or max(factor, self.tile * 3 // 4 // factor * factor)
        for name, value in (("tile", self.tile), ("stride", stride)):
            if value % factor:
                raise ConfigError(
                    f"model.vae_tiling.{name}={value}: the VAE downsamples {factor}x, so tiles "
                    f"must start and end on latent pixels; use a multiple of {factor}"
                )
        return stride

    def apply(self, vae: Any) -> Any:
        """``vae`` with tiling (and slicing) on; returns it."""
        if not hasattr(vae, "enable_tiling"):
            raise ConfigError(f"model.vae_tiling is set but {type(vae).__name__} cannot tile; "
                              "drop model/vae_tiling")  # fmt: skip
        factor = vae_scale_factor(vae)
        stride = self.stride_for(factor)
        params = inspect.signature(vae.enable_tiling).parameters
        if "tile_sample_min_height" in params:  # the video VAEs take the sizes as arguments
            vae.enable_tiling(tile_sample_min_height=self.tile, tile_sample_min_width=self.tile,
                              tile_sample_stride_height=stride,
                              tile_sample_stride_width=stride)  # fmt: skip
        else:
            # AutoencoderKL's enable_tiling() takes no sizes: it reads these attributes, with
            # the overlap as a fraction of the tile.
            vae.tile_sample_min_size, vae.tile_latent_min_size = self.tile, self.tile // factor
            vae.tile_overlap_factor = 1 - stride / self.tile
            vae.enable_tiling()
        if self.slicing:
            vae.enable_slicing()
        return vae
