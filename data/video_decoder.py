"""Raw webdataset sample with a video member -> training clip (or None when skipped), run inside
data workers like data.decoders.ImageDecoder."""

from __future__ import annotations

import random
from typing import Any

import torch

from data.buckets import resize_crop
from data.decoders import Raw, admit, pick_caption
from data.metadata import CaptionPicker, MetadataFilter
from data.transforms import SkipCounter, to_tensor
from data.video import VIDEO_KEYS, ClipSampler, VideoError, decode_frames, probe


class VideoDecoder:
    """Probe, sample ``sampler.num_frames`` frames, resize and crop every frame of the clip alike.

    Samples carry ``pixel_values`` [3, F, H, W] in [-1, 1] (the layout diffusers' video VAEs
    take once batched: [B, 3, F, H, W]), ``fps`` (the sampled rate), ``caption``, ``key`` and
    the size fields images carry. Skips, counted: no video member (``missing_video``), a file
    that does not open or ends early (``decode_error``), a clip shorter than the sampler needs
    (``filtered_short``: a filter, not bad data).
    """

    def __init__(
        self,
        sampler: ClipSampler,
        resolution: int,
        counter: SkipCounter,
        captions: CaptionPicker | None = None,
        metadata_filter: MetadataFilter | None = None,
        video_keys: tuple[str, ...] = VIDEO_KEYS,
        center_crop: bool = True,
        random_flip: bool = False,
        require_caption: bool = True,
    ) -> None:
        self.sampler, self.resolution, self.counter = sampler, resolution, counter
        self.captions = captions or CaptionPicker()
        self.filter, self.video_keys = metadata_filter, tuple(video_keys)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.require_caption = require_caption

    def _check(self, raw: Raw, rng: random.Random) -> tuple[str, str] | str:
        """The video member and caption, or the skip reason."""
        video_key = next((k for k in self.video_keys if k in raw), None)
        if video_key is None:
            return "missing_video"
        if not raw[video_key]:
            return "empty_member"
        if self.filter is not None and (reason := self.filter.reason(raw, None)):
            return f"filtered_{reason}"
        caption = pick_caption(self.captions, raw, rng, self.require_caption)
        return "missing_caption" if caption is None else (video_key, caption)

    def __call__(
        self, raw: Raw, rng: random.Random, bucket: int | None = None
    ) -> dict[str, Any] | None:
        admitted = admit(self.counter, raw, self._check(raw, rng))
        if admitted is None:
            return None
        key, (video_key, caption) = admitted
        try:
            info = probe(raw[video_key])
            times = self.sampler.times(info, rng)
            if times is None:
                self.counter.skip("filtered_short", key, f"{info.duration:.2f} s at "
                                  f"{info.fps:g} fps, a clip needs "
                                  f"{self.sampler.needed(info):.2f} s")  # fmt: skip
                return None
            frames = decode_frames(raw[video_key], times, 1.0 / info.fps)
        except VideoError as exn:
            self.counter.skip("decode_error", key, f"{video_key}: {exn}")
            return None
        target = (self.resolution, self.resolution)
        state = rng.getstate()  # one crop and flip, replayed for every frame of the clip
        clip = []
        for frame in frames:
            rng.setstate(state)
            image, crop = resize_crop(frame, target, self.center_crop, self.random_flip, rng)
            clip.append(to_tensor(image))
        return {
            "pixel_values": torch.stack(clip, dim=1),  # [3, F, H, W]
            "fps": torch.tensor(self.sampler.fps or info.fps, dtype=torch.float32),
            "caption": caption,
            "key": key,
            "original_size": torch.tensor((info.height, info.width), dtype=torch.long),
            "crop_top_left": torch.tensor(crop, dtype=torch.long),
            "target_size": torch.tensor((target[1], target[0]), dtype=torch.long),
        }
