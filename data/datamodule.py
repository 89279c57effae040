"""LightningDataModule streaming image-text pairs from WebDataset tar shards (img2dataset layout).

One epoch is one pass over the shards: shards are split across nodes, then across DataLoader
workers, and batching happens inside the workers.
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import lightning as L
import webdataset as wds

from data.transforms import Collate, SampleDecoder, SkipCounter

HINT = "check the path or run `ldm-data demo DIR` to write the demo shards"


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _missing(spec: str, detail: str) -> FileNotFoundError:
    return FileNotFoundError(f"data.urls={spec!r} {detail}; {HINT}")


def _resolve_one(spec: str) -> list[str]:
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise _missing(spec, "is a directory with no .tar files")
        return shards
    if path.suffix == ".txt" and path.is_file():
        return _resolve_list_file(path)
    expanded = [os.path.expanduser(u) for u in braceexpand.braceexpand(spec)]
    if any(glob.has_magic(u) for u in expanded):
        shards = sorted({m for u in expanded for m in glob.glob(u)})
        if not shards:
            raise _missing(spec, "matched no shard files")
        return shards
    absent = [u for u in expanded if not os.path.exists(u)]
    if len(absent) == len(expanded):
        raise _missing(spec, "matched no shard files")
    if absent:
        shown = ", ".join(absent[:3]) + (" ..." if len(absent) > 3 else "")
        raise _missing(spec, f"names {len(absent)} missing shard files ({shown})")
    return expanded


def _resolve_list_file(path: Path) -> list[str]:
    shards: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # Relative entries are relative to the list file, so a dataset folder can be moved.
        if not _is_remote(line) and not os.path.isabs(os.path.expanduser(line)):
            line = str(path.parent / line)
        shards.extend(_resolve_one(line))
    if not shards:
        raise _missing(str(path), "is a list file with no entries")
    return shards


def resolve_shards(urls: str | list[str]) -> list[str]:
    """Expand ``urls`` into shard URLs, checking that local ones exist.

    Accepts a brace pattern (``dir/shapes-{000000..000007}.tar``), a glob, a directory (all its
    ``*.tar``, sorted), a ``.txt`` list file (one URL, path or pattern per line), or a list of
    any of these. Remote URLs (``scheme://`` or ``pipe:``) pass through unchecked.
    """
    specs = [urls] if isinstance(urls, (str, Path)) else list(urls)
    if not specs:
        raise _missing(str(urls), "is empty")
    return [shard for spec in specs for shard in _resolve_one(str(spec))]


def _is_sample(sample: dict[str, Any] | None) -> bool:
    return sample is not None


def shutdown_workers(loader: Any) -> None:
    """Stop a WebLoader's DataLoader workers now.

    Lightning keeps the loader in reference cycles; when the garbage collector finally breaks
    them, the worker queues can be finalised before the DataLoader iterator, and each persistent
    worker then waits out a 5 s join timeout. Lightning shuts down plain DataLoaders itself but
    cannot see the one inside a WebLoader.
    """
    stages = loader.pipeline if isinstance(loader, wds.DataPipeline) else [loader]
    for stage in stages:
        iterator = getattr(stage, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            stage._iterator = None


class EpochShardList(wds.SimpleShardList):
    """Shard list reshuffled every pass with ``seed + epoch``.

    Every rank and worker keeps its own copy and counts its own passes, so they all agree on the
    order before ``split_by_node``/``split_by_worker`` slice it (workers must be persistent).
    """

    def __init__(self, urls: list[str], seed: int | None, start_epoch: int = 0) -> None:
        super().__init__(urls, seed=None)
        self.shuffle_seed = seed
        self.epoch = start_epoch - 1

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1
        urls = list(self.urls)
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed + self.epoch).shuffle(urls)
        for url in urls:
            yield {"url": url}


class WebDatasetDataModule(L.LightningDataModule):
    """Batches of ``pixel_values`` [B,3,R,R] in [-1,1], ``input_ids``/``attention_mask`` [B,L],
    ``caption``, ``key`` and ``skipped`` (per-reason counts of samples this worker dropped since
    its previous batch; sum them across batches to get totals)."""

    def __init__(
        self,
        urls: str | list[str],
        tokenizer: Any,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        caption_key: str = "txt",
        image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
        random_flip: bool = False,
        center_crop: bool = True,
        val_urls: str | list[str] | None = None,
        val_batches: int = 4,
        max_pixels: int = 178_956_970,
        max_skip_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        # Resolved here so a bad path fails before any model is built.
        self.shards = resolve_shards(urls)
        self.val_shards = resolve_shards(val_urls) if val_urls is not None else None
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.caption_key = caption_key
        self.image_keys = tuple(image_keys)
        self.random_flip = random_flip
        self.center_crop = center_crop
        self.val_batches = val_batches
        self.max_pixels = max_pixels
        self.max_skip_fraction = max_skip_fraction
        self._loaders: list[Any] = []
        if num_workers > 0:
            # A fast tokenizer used before the workers fork warns in every worker otherwise.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def _describe(self, shards: list[str]) -> str:
        return shards[0] if len(shards) == 1 else f"{shards[0]} .. {shards[-1]} ({len(shards)})"

    def _start_epoch(self) -> int:
        # A loader rebuilt mid-run (resume, reload_dataloaders_every_n_epochs) continues the
        # epoch sequence instead of replaying epoch 0's order.
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _stages(self, shards: list[str], train: bool) -> list[Any]:
        counter = SkipCounter(self.max_skip_fraction, self._describe(shards))
        decoder = SampleDecoder(
            self.resolution,
            counter,
            caption_key=self.caption_key,
            image_keys=self.image_keys,
            center_crop=self.center_crop if train else True,
            random_flip=self.random_flip and train,
            max_pixels=self.max_pixels,
            seed=self.seed,
        )
        epoch = self._start_epoch() if train else 0
        shuffler = None
        if train and self.shuffle_buffer > 0:
            shuffler = wds.detshuffle(self.shuffle_buffer, seed=self.seed, epoch=epoch - 1)
        return [
            EpochShardList(shards, seed=self.seed if train else None, start_epoch=epoch),
            # Validation is not split by node: every rank scores the same few batches, so a rank
            # can never end up with no validation data (and hang a synced metric).
            wds.split_by_node if train else None,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=counter.tar_handler),
            shuffler,
            wds.map(decoder),
            wds.select(_is_sample),
            wds.batched(
                self.batch_size, collation_fn=Collate(self.tokenizer, counter), partial=not train
            ),
        ]

    def train_pipeline(self) -> wds.DataPipeline:
        return wds.DataPipeline(*self._stages(self.shards, train=True))

    def val_pipeline(self) -> wds.DataPipeline:
        if self.val_shards is None:
            raise ValueError("no val_urls were given")
        return wds.DataPipeline(*self._stages(self.val_shards, train=False))

    def train_dataloader(self) -> wds.WebLoader:
        # Workers without a shard simply yield nothing: DataPipeline has no empty check.
        loader = wds.WebLoader(
            self.train_pipeline(),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        self._loaders.append(loader)
        return loader

    def val_dataloader(self) -> Any:
        if self.val_shards is None:
            return []
        workers = min(self.num_workers, len(self.val_shards))
        loader = wds.WebLoader(self.val_pipeline(), batch_size=None, num_workers=workers)
        self._loaders.append(loader)
        # Worker outputs interleave in a fixed order, so the first batches are always the same.
        return loader.slice(self.val_batches)

    def teardown(self, stage: str) -> None:
        for loader in self._loaders:
            shutdown_workers(loader)
        self._loaders.clear()
