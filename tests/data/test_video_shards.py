"""Video shards: real files encoded with FFmpeg (through PyAV) in several codecs, frame rates and
sizes, read, sampled and counted as data/video.py says; and the frame-count rule's errors."""

from __future__ import annotations

import io
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data.datamodule import WebDatasetDataModule
from data.folder import folder_to_shards
from data.shards import write_shards
from data.tools import inspect_shards, validate_shards
from data.transforms import ALL_REASONS, SkipCounter
from data.video import ClipSampler, FrameRule, probe
from data.video_decoder import VideoDecoder

# (name, container, codec, fps, (w, h), frames); each frame's gray level tells its index.
VIDEOS = [
    ("h264", "mp4", "libx264", 24, (48, 32), 36),  # 1.5 s
    ("vp9", "webm", "libvpx-vp9", 12, (40, 40), 24),  # 2 s
    ("ffv1", "matroska", "ffv1", 8, (32, 48), 12),  # 1.5 s, lossless
    ("short", "mp4", "mpeg4", 8, (32, 32), 4),  # 0.5 s: shorter than a 5-frame clip at 8 fps
]
MEMBER = {"mp4": "mp4", "webm": "webm", "matroska": "mkv"}
SAMPLER = ClipSampler(num_frames=5, fps=8, rule=FrameRule(4, 1))


def level(i: int) -> int:
    return 16 + 6 * i


def encode(container: str, codec: str, fps: int, size: tuple[int, int], frames: int) -> bytes:
    """Frame i: gray level(i), with a black bar over the left third (to see flips)."""
    buf = io.BytesIO()
    w, h = size
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            arr = np.full((h, w, 3), level(i), np.uint8)
            arr[:, : w // 3] = 0
            out.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def frame_index(frame: torch.Tensor) -> tuple[int, bool]:
    """(source frame index, flipped) of one sampled frame [3, H, W] in [-1, 1]."""
    pixels = (frame.float() + 1) * 127.5
    w = pixels.shape[-1]
    left, right = pixels[..., : w // 8].mean(), pixels[..., -(w // 8) :].mean()
    flipped = bool(right < left)
    body = pixels[..., : w // 2] if flipped else pixels[..., w // 2 :]
    return round((body.mean().item() - 16) / 6), flipped


@pytest.fixture(scope="module")
def videos() -> dict[str, bytes]:
    out = {name: encode(c, codec, fps, size, n) for name, c, codec, fps, size, n in VIDEOS}
    whole = out["h264"]
    out["truncated_mp4"] = whole[: len(whole) // 2]  # the index (moov) is lost: does not open
    lossless = out["ffv1"]
    out["truncated_mkv"] = lossless[: len(lossless) * 2 // 5]  # opens; its frames end early
    return out


def raw(name: str, data: bytes) -> dict:
    default = "mp4" if "mp4" in name else "matroska"  # the truncated copies
    container = next((c for n, c, *_ in VIDEOS if n == name), default)
    return {"__key__": name, MEMBER[container]: data, "txt": f"a clip of {name}"}


def test_probe_reads_each_container_header(videos: dict[str, bytes]) -> None:
    for name, _, _, fps, (w, h), frames in VIDEOS:
        info = probe(videos[name])
        assert (info.width, info.height, round(info.fps)) == (w, h, fps), name
        assert info.duration == pytest.approx(frames / fps, abs=1.01 / fps), name


def test_clips_are_sampled_at_the_asked_rate_from_every_codec(videos: dict[str, bytes]) -> None:
    """From the start (evaluation): frame j of a clip at 8 fps is source frame j * fps / 8."""
    decoder = VideoDecoder(ClipSampler(5, fps=8, rule=FrameRule(4, 1), random_start=False), 16,
                           SkipCounter(1.0, "test"))  # fmt: skip
    for name, _, _, fps, _, _ in VIDEOS[:3]:
        sample = decoder(raw(name, videos[name]), random.Random(0))
        assert sample is not None, name
        assert sample["pixel_values"].shape == (3, 5, 16, 16)
        got = [frame_index(sample["pixel_values"][:, j])[0] for j in range(5)]
        # The frame nearest each time (12 fps: 1.5 source frames apart, either of a tie).
        assert all(abs(g - j * fps / 8) <= 0.5 for j, g in enumerate(got)), (name, got)
        assert sample["fps"].item() == 8.0


def test_a_clip_starts_at_random_and_flips_all_its_frames_alike(videos: dict[str, bytes]) -> None:
    decoder = VideoDecoder(SAMPLER, 16, SkipCounter(1.0, "test"), random_flip=True)
    starts, flips = set(), Counter()
    for seed in range(12):
        sample = decoder(raw("h264", videos["h264"]), random.Random(seed))
        frames = [frame_index(sample["pixel_values"][:, j]) for j in range(5)]
        indices, flipped = zip(*frames, strict=True)
        assert len(set(flipped)) == 1, frames  # one flip for the whole clip
        steps = [b - a for a, b in zip(indices, indices[1:], strict=False)]
        assert steps == [3] * 4  # a 24 fps source sampled at 8
        starts.add(indices[0])
        flips[flipped[0]] += 1
    # Source frames 0..35; a clip spans 12 of them (4 steps of 3): starts 0..23.
    assert len(starts) >= 4 and max(starts) <= 23
    assert flips[True] and flips[False]


def test_short_truncated_and_missing_videos_are_skipped_and_counted(
    videos: dict[str, bytes],
) -> None:
    counter = SkipCounter(1.0, "test")
    decoder = VideoDecoder(SAMPLER, 16, counter)
    rng = random.Random(0)
    assert decoder(raw("short", videos["short"]), rng) is None
    assert decoder(raw("truncated_mp4", videos["truncated_mp4"]), rng) is None
    assert decoder(raw("truncated_mkv", videos["truncated_mkv"]), rng) is None
    assert decoder({"__key__": "image", "jpg": b"...", "txt": "an image"}, rng) is None
    assert decoder(raw("vp9", videos["vp9"]), rng) is not None
    counted = {k: v for k, v in counter.totals.items() if v}
    assert counted == {"filtered_short": 1, "decode_error": 2, "missing_video": 1}


def test_video_shards_stream_in_batches_with_the_skips_counted(
    videos: dict[str, bytes], tmp_path: Path
) -> None:
    names = ["h264", "vp9", "ffv1", "short", "truncated_mp4", "truncated_mkv"]
    write_shards((raw(n, videos[n]) for n in names * 2), str(tmp_path / "clips-%06d.tar"), 6)
    dm = WebDatasetDataModule(str(tmp_path), resolution=16, batch_size=2, shuffle_buffer=0,
                              video=SAMPLER, random_flip=True)  # fmt: skip
    batches = list(dm.train_dataloader())
    # As for images: one batch per 2 samples read, smaller where some of them were skipped.
    assert len(batches) == 6
    assert {b["pixel_values"].shape[1:] for b in batches} == {(3, 5, 16, 16)}
    assert {k for b in batches for k in b["key"]} == {"h264", "vp9", "ffv1"}
    total: Counter[str] = Counter()
    for batch in batches:
        total.update(batch["skipped"])
    assert {k: v for k, v in total.items() if v} == {"filtered_short": 2, "decode_error": 4}


def test_a_frame_count_the_model_cannot_take_names_the_nearest_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"num_frames=8: .*4k\+1 .* 5 or 9"):
        ClipSampler(num_frames=8, rule=FrameRule(4, 1))
    with pytest.raises(ValueError, match=r"num_frames=12: .*8k\+1 .* 9 or 17"):
        ClipSampler(num_frames=12, rule=FrameRule(8, 1))
    assert ClipSampler(num_frames=7).num_frames == 7  # a per-frame VAE takes any count
    assert FrameRule(4, 1).nearest(0) == [1]


def test_a_folder_of_videos_becomes_shards_that_inspect_and_validate_describe(
    videos: dict[str, bytes], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    names = ["h264", "vp9", "ffv1", "short", "truncated_mkv"]
    for name in names:
        suffix = {"vp9": ".webm", "ffv1": ".mkv", "truncated_mkv": ".mkv"}.get(name, ".mp4")
        (src / f"{name}{suffix}").write_bytes(videos[name])
        (src / f"{name}.txt").write_text(f"a clip of {name}")
    result = folder_to_shards(src, tmp_path / "shards", samples_per_shard=3)
    assert (result.images, result.written, result.unreadable) == (5, 5, [])

    stats = inspect_shards(str(tmp_path / "shards"))
    video = stats["video"]
    assert (video["videos"], video["unreadable"]) == (5, 0)
    assert video["fps"] == {"8": 3, "24": 1, "12": 1}
    assert video["sizes"] == {"32x48": 2, "48x32": 1, "40x40": 1, "32x32": 1}
    assert video["duration_s"]["p100"] == pytest.approx(2.0, abs=0.1)  # the 2 s webm
    assert stats["members"]["mp4"] == 2 and stats["members"]["mkv"] == 2

    summary = validate_shards(str(tmp_path / "shards"))
    assert summary.samples == 5
    bad = [(p.key, p.reason) for p in summary.examples]
    assert len(bad) == 1 and bad[0][1] == "decode_error", bad  # the truncated mkv
    assert "truncated?" in summary.examples[0].detail


def test_skip_totals_of_a_checkpoint_older_than_the_video_reasons_are_restored_by_name() -> None:
    from train.callbacks.data_health import DataHealthMonitor

    monitor = DataHealthMonitor()
    monitor.load_state_dict({"reasons": ["decode_error", "missing_caption"], "per_rank": [[3, 4]]})
    (row,) = monitor._per_rank
    assert dict(zip(ALL_REASONS, row, strict=True)) == dict.fromkeys(ALL_REASONS, 0) | {
        "decode_error": 3, "missing_caption": 4}  # fmt: skip
