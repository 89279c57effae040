"""A look at the first samples of the first local shard, before anything is built.

Shards whose samples have no caption in the configured field (no `KEY.txt`, or captions kept in
`json.caption` while `data.caption_fields=txt`) train nothing: the loader skips every sample
and stops, but only after the model is built and the loader started. Reading the small members
of the first samples (images are not read) catches that in milliseconds.
"""

from __future__ import annotations

import tarfile
from typing import Any

from data.metadata import field
from data.sources import is_remote

SAMPLES = 32  # a set whose first 32 samples are uncaptioned is not worth a start
VIDEO_SAMPLES = 8  # videos are larger: their headers are read, not their frames


def first_samples(shard: str, fields: list[str], limit: int = SAMPLES) -> list[dict[str, Any]]:
    """The members `fields` read from (txt, json, ...) of the shard's first `limit` samples,
    grouped as webdataset does: the key is the path up to the first dot of the file name. The
    other members are listed with the value None (not read)."""
    wanted = {name.split(".", 1)[0] for name in fields}
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            folder, _, base = member.name.rpartition("/")
            key, dot, ext = base.partition(".")
            if not member.isfile() or not dot:
                continue
            if f"{folder}/{key}" not in samples:
                if len(samples) == limit:
                    break
                samples[f"{folder}/{key}"] = {}
            wanted_ext = ext in wanted
            samples[f"{folder}/{key}"][ext] = tar.extractfile(member).read() if wanted_ext else None
    return list(samples.values())


def caption_names(fields: str | dict[str, float]) -> list[str]:
    """The fields of ``data.caption_fields`` (one name, or a {name: weight} mapping)."""
    return [fields] if isinstance(fields, str) else list(fields)


def local_first_samples(shards: list[str], fields: list[str]) -> list[dict[str, Any]] | None:
    """:func:`first_samples` of ``shards[0]``; None when it is remote (opening one costs a round
    trip) or unreadable: those are the loader's to report, skip and count."""
    if not shards or is_remote(shards[0]):
        return None
    try:
        return first_samples(shards[0], fields)
    except (OSError, tarfile.TarError):
        return None


def caption_problem(
    key: str, spec: Any, shard: str, samples: list[dict[str, Any]], fields: str | dict[str, float]
) -> str | None:
    """What to tell the user when none of ``samples`` (the first of ``shard``, read with the
    names of ``fields``) has a caption in ``fields`` (data.caption_fields); None when one has."""
    names = caption_names(fields)
    for raw in samples:
        if any(isinstance(v, str) and v.strip() for v in (field(raw, n) for n in names)):
            return None
    if not samples:
        return None
    shown = fields if isinstance(fields, str) else ",".join(names)
    return (
        f"{key}={spec!r}: none of the first {len(samples)} samples of {shard} has a caption "
        f"in data.caption_fields={shown}; add KEY.txt captions (ldm-data from-folder writes "
        "them), or set data.caption_fields to the field that holds them (e.g. json.caption); "
        "see ldm-data inspect"
    )


def media_problem(
    key: str,
    shard: str,
    samples: list[dict[str, Any]],
    wanted: tuple[str, ...],
    other: tuple[str, ...],
    hint: str,
) -> str | None:
    """What to tell the user when none of ``samples`` (the first of ``shard``) holds a
    ``wanted`` member (an image for an image config, a video for ``data.video``) but they hold
    ``other`` ones: every sample would be skipped, after the model is built."""
    members = {ext for raw in samples for ext in raw}
    if not samples or members & set(wanted) or not members & set(other):
        return None
    return (
        f"{key}: the first {len(samples)} samples of {shard} hold "
        f"{'|'.join(sorted(members & set(other)))} members and no {'|'.join(wanted)}; {hint}"
    )


def short_clips_problem(
    key: str, shard: str, sampler: Any, video_keys: tuple[str, ...]
) -> str | None:
    """What to tell the user when every one of the first videos of ``shard`` is too short for
    one clip of ``sampler`` (a ``data.video.ClipSampler``): every sample would be skipped as
    too short, after the model is built. None when one is long enough (the loader then skips
    and counts the short ones) or none could be probed (the loader counts those too)."""
    import random

    from data.video import VideoError, probe

    infos = []
    for raw in first_samples(shard, list(video_keys), limit=VIDEO_SAMPLES):
        member = next((raw[k] for k in video_keys if raw.get(k)), None)
        if not member:
            continue
        try:
            infos.append(probe(member))
        except VideoError:
            continue
    fixed = random.Random(0)
    if not infos or any(sampler.times(info, fixed) is not None for info in infos):
        return None
    lengths = sorted(info.duration for info in infos)
    fps = f"{sampler.fps:g} fps" if sampler.fps else "the videos' own rate"
    return (
        f"{key}: none of the first {len(infos)} videos of {shard} is long enough for a clip of "
        f"data.video.num_frames={sampler.num_frames} at {fps} (it needs "
        f"{sampler.needed(infos[0]):.2f} s; they last {lengths[0]:.2f}-{lengths[-1]:.2f} s): "
        "lower data.video.num_frames (to a count the model takes) or data.video.fps"
    )


def latent_media_problem(key: str, shard: str, video: bool) -> str | None:
    """What to tell the user when the first ``latent.npy`` of an encoded ``shard`` holds image
    latents [2C, h, w] under a video config (``video``), or a clip's [2C, F', h, w] under an
    image one; None when it fits or the shard has none (the loader reports those)."""
    from data.decoders import npy_shape

    with tarfile.open(shard) as tar:
        member = next((m for m in tar if m.isfile() and m.name.endswith(".latent.npy")), None)
        if member is None:
            return None
        shape = npy_shape(tar.extractfile(member).read())
    if video and len(shape) == 3:
        return (f"{key}: {shard} holds image latents ({member.name}: [2C, h, w] = "
                f"{list(shape)}) but data.video is set: encode video shards with the video config "
                "(ldm-data encode OUT +data/video=clips ...), or drop +data/video")  # fmt: skip
    if not video and len(shape) == 4:
        return (f"{key}: {shard} holds clip latents ({member.name}: [2C, F', h, w] = "
                f"{list(shape)}) but data.video is not set: train them with a video model and "
                "+data/video=clips at the num_frames they were encoded with")  # fmt: skip
    return None
