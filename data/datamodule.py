"""LightningDataModule streaming image-text (or precomputed latent) samples from tar shards.

Every rank and worker reads an equal, disjoint range of the epoch's samples (``data.plan``), so
ranks never wait on each other at an epoch's end, and the position in the epoch is saved in
checkpoints through the train loader's ``state_dict`` (``data.loader``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data.buckets import AspectBuckets
from data.controls import Control
from data.decoders import IMAGE_KEYS, ImageDecoder, LatentDecoder
from data.loader import POSITION_KEY, StatefulLoader
from data.metadata import CaptionPicker, MetadataFilter
from data.sources import ShardSizes, resolve_shards
from data.stream import ShardStream
from data.transforms import Collate, SkipCounter
from data.video import VIDEO_KEYS, ClipSampler
from data.video_decoder import VideoDecoder

# Kept for callers that imported it from here.
__all__ = ["WebDatasetDataModule", "resolve_shards"]


class _Limited:
    """The first ``n`` batches of a loader, with a length Lightning can read."""

    def __init__(self, loader: DataLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch


def _datasets(
    urls: str | list[str] | None, datasets: list[dict[str, Any]] | None
) -> tuple[list[str], list[float]]:
    if (urls is None) == (datasets is None):
        raise ValueError("set exactly one of data.urls and data.datasets ([{urls, weight}, ...])")
    if datasets is None:
        shards = resolve_shards(urls)  # type: ignore[arg-type]
        return shards, [1.0] * len(shards)
    shards, weights = [], []
    for i, ds in enumerate(datasets):
        if "urls" not in ds:
            raise ValueError(f"data.datasets[{i}] has no `urls`")
        found = resolve_shards(ds["urls"])
        shards += found
        weights += [float(ds.get("weight", 1.0))] * len(found)
    return shards, weights


class WebDatasetDataModule(L.LightningDataModule):
    """Batches of ``pixel_values`` [B,3,H,W] in [-1,1] (or ``latent_moments`` [B,2C,h,w] and
    ``encoder_hidden_states`` [B,L,D] from latent shards), ``input_ids``/``attention_mask``
    [B,L], ``caption``, ``key``, SDXL size fields and ``skipped`` (per-reason counts of samples
    the worker dropped since its previous batch)."""

    def __init__(
        self,
        urls: str | list[str] | None = None,
        tokenizer: Any = None,
        resolution: int = 256,
        batch_size: int = 16,
        datasets: list[dict[str, Any]] | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        steps_per_epoch: int | None = None,
        caption_fields: str | dict[str, float] = "txt",
        caption_dropout: float = 0.0,
        metadata_filter: MetadataFilter | None = None,
        buckets: AspectBuckets | None = None,
        latents: bool = False,
        image_keys: tuple[str, ...] = IMAGE_KEYS,
        random_flip: bool = False,
        center_crop: bool = True,
        val_urls: str | list[str] | None = None,
        val_batches: int = 4,
        max_pixels: int = 178_956_970,
        max_skip_fraction: float = 0.5,
        sizes_cache: str | None = None,
        sizes_file: str | None = None,
        prefetch_factor: int | None = None,
        require_caption: bool = False,
        control: Control | None = None,
        mask: Control | None = None,
        video: ClipSampler | None = None,
        video_keys: tuple[str, ...] = VIDEO_KEYS,
    ) -> None:
        """``video``: read clips from video members (``video_keys``) instead of images;
        batches then carry ``pixel_values`` [B, 3, F, H, W] and ``fps`` [B]. With ``latents``
        the clips were sampled and encoded by ``ldm-data encode`` (``latent_moments``
        [B, 2C, F', h, w]); ``video`` then only states what they hold."""
        super().__init__()
        # Resolved and counted here so a bad path fails before any model is built.
        self.shards, self.weights = _datasets(urls, datasets)
        count = ShardSizes(sizes_cache, sizes_file)
        self.sizes = count(self.shards)
        self.val_shards = resolve_shards(val_urls) if val_urls is not None else None
        self.val_sizes = count(self.val_shards) if self.val_shards is not None else None
        self.tokenizer = None if latents else tokenizer
        self.resolution, self.batch_size = resolution, batch_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.resampled, self.steps_per_epoch = resampled, steps_per_epoch
        self.captions = CaptionPicker(caption_fields, caption_dropout)
        self.metadata_filter, self.buckets, self.latents = metadata_filter, buckets, latents
        self.image_keys = tuple(image_keys)
        self.random_flip, self.center_crop = random_flip, center_crop
        self.val_batches, self.max_pixels = val_batches, max_pixels
        self.max_skip_fraction = max_skip_fraction
        for key, value in (("control", control), ("mask", mask)):
            if value is not None and latents:
                raise ValueError(f"data.{key} is set but data.latents=true: encoded shards hold "
                                 "no images; train ControlNet and inpainting models on image "
                                 "shards")  # fmt: skip
        self.control, self.mask = control, mask
        self.video, self.video_keys = video, tuple(video_keys)
        if video is not None and (buckets is not None or control or mask):
            raise ValueError("data.video is set with data.buckets, data.control or data.mask: "
                             "video clips are read from video shards at data.resolution, "
                             "without those (set them to null)")  # fmt: skip
        # A model that reads captions though the loader does not tokenize them (conditioners
        # with several tokenizers tokenize in the step) still needs every sample captioned.
        self.require_caption = require_caption or self.tokenizer is not None or latents
        self._train_loader: StatefulLoader | None = None
        if num_workers > 0:
            # A fast tokenizer used before the workers fork warns in every worker otherwise.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if sum(self.sizes) == 0:
            raise ValueError(f"data: the {len(self.shards)} shards hold no samples")

    def decoder(self, counter: SkipCounter, train: bool) -> Any:
        """The per-sample decoder (training or evaluation settings: no flips, no dropout)."""
        if self.latents:
            return LatentDecoder(counter, self.metadata_filter)
        captions = self.captions if train else CaptionPicker(self.captions.fields)
        if self.video is not None:
            return VideoDecoder(
                self.video if train else replace(self.video, random_start=False),
                self.resolution,
                counter,
                captions=captions,
                metadata_filter=self.metadata_filter,
                video_keys=self.video_keys,
                center_crop=self.center_crop if train else True,
                random_flip=self.random_flip and train,
                require_caption=self.require_caption,
            )
        return ImageDecoder(
            self.resolution,
            counter,
            captions=captions,
            metadata_filter=self.metadata_filter,
            buckets=self.buckets,
            image_keys=self.image_keys,
            center_crop=self.center_crop if train else True,
            random_flip=self.random_flip and train,
            max_pixels=self.max_pixels,
            # The autoencoder stage learns from images whether captioned or not.
            require_caption=self.require_caption,
            control=self.control,
            mask=self.mask,
        )

    def _stream(self, shards: list[str], sizes: list[int], train: bool) -> ShardStream:
        counter = SkipCounter(self.max_skip_fraction, _describe(shards))
        decoder = self.decoder(counter, train)
        bucketed = self.buckets is not None or self.latents
        return ShardStream(
            shards,
            sizes,
            self.weights if train else [1.0] * len(shards),
            self.batch_size,
            decoder,
            Collate(self.tokenizer),
            counter,
            seed=self.seed,
            shuffle=train and self.shuffle_buffer > 0,
            window=self.shuffle_buffer if self.shuffle_buffer > 0 else 8 * self.batch_size,
            resampled=train and self.resampled,
            steps_per_epoch=self.steps_per_epoch,
            bucket_of=decoder.bucket_of if bucketed else None,
        )

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch)

    def train_dataloader(self) -> StatefulLoader:
        stream = self._stream(self.shards, self.sizes, train=True)
        stream.configure(*self._rank_world(), self.num_workers)
        if len(stream) == 0:
            raise ValueError(
                f"data: {sum(self.sizes)} samples make no full batch of {self.batch_size} for "
                f"each of {stream.slots} readers (ranks × data.num_workers); lower "
                "data.batch_size or data.num_workers, or add shards"
            )
        loader = StatefulLoader(
            stream,
            num_workers=self.num_workers,
            epoch_fn=self._epoch if self.trainer is not None else None,
            prefetch_factor=self.prefetch_factor,
        )
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> Any:
        if self.val_shards is None or self.val_sizes is None:
            return []
        stream = self._stream(self.val_shards, self.val_sizes, train=False)
        # Not split by rank: every rank scores the same few batches, so none is left without
        # validation data (and a synced metric cannot hang).
        workers = min(self.num_workers, len(self.val_shards))
        stream.configure(0, 1, workers)
        return _Limited(DataLoader(stream, batch_size=None, num_workers=workers), self.val_batches)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        position = batch.pop(POSITION_KEY, None) if isinstance(batch, dict) else None
        training = self.trainer is not None and self.trainer.training
        if position is not None and self._train_loader is not None and training:
            self._train_loader.mark_consumed(position)
        return batch


def _describe(shards: list[str]) -> str:
    if len(shards) == 1:
        return shards[0]
    return f"{shards[0]} .. {Path(shards[-1]).name} ({len(shards)} shards)"
