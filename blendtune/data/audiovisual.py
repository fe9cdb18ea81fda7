"""Audio-visual datasets read from files: a catalog of clips (a WAV file, a folder of JPEG frames, labels),
a dataset that decodes them lazily in DataLoader workers, and the file checks behind `blendtune data check`.

CREMA-D (crema_d.py) and the Kinetics-Sounds / VGGSound CSV layout (av_csv.py) only say where their
files are; everything else is here.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
import os
import sys

import soundfile
import torch
from torch.utils.data import Dataset, default_collate

from blendtune.data.audio import MIN_CLIP_S, LogSpectrogram, fit_to_window, read_clip
from blendtune.data.base import DatasetAdapter, DataCheck, Problem, class_coverage, data_root
from blendtune.data.clip_cache import ClipCache, build_cache, cache_dir, fresh_cache
from blendtune.data.frames import pick_frames
from blendtune.data.video import read_video_audio, read_video_frames, video_problem
from blendtune.errors import OptionError, UserError

SHORT_CLIP = "short clip"  # decodable, so training only warns; `data check` lists it as a problem
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SPLITS = ("train", "test")

if TYPE_CHECKING:  # torchvision is imported where used: it costs seconds at every start
    from torchvision.transforms import v2


@dataclass
class Sample:
    id: str
    split: str
    labels: tuple[str, ...]
    audio: Path          # a WAV, or the video file itself when its audio comes from there
    frames: Path | None  # a folder of JPEG frames; None: an audio-only sample or frames from `video`
    group: str | None = None
    video: Path | None = None  # frames (and, without a WAV, audio) decoded from this file (torchcodec)


@dataclass
class Catalog:
    samples: list[Sample]
    classes: list[str]
    multilabel: bool = False
    problems: list[Problem] = field(default_factory=list)  # rows that name no usable sample


@dataclass
class ClipConfig:
    """The options every file-based audio-visual layout shares (config section data.<layout>)."""
    sample_rate: int = 22050
    window_s: float = 3.0
    n_fft: int = 512
    hop_length: int = 353
    n_mels: int = 0              # 0: log-magnitude STFT (as OGM-GE); > 0: log-mel
    pad: str = "tile"            # a short clip is repeated (tile, as OGM-GE) or zero-padded (zero)
    num_frames: int = 1          # frames sampled per clip (random in training, evenly spaced in evaluation)
    image_size: int = 224
    cache_frame_size: int = 0    # prepared cache (`blendtune data prepare`): frames stored at this square size
                                 # (0: image_size * 8 / 7, what a crop of image_size is taken from)

    def validate(self) -> None:
        if self.pad not in ("tile", "zero"):
            raise OptionError("pad", f"expected one of tile, zero, got {self.pad!r}")
        for key in ("num_frames", "image_size", "sample_rate", "n_fft", "hop_length"):
            if getattr(self, key) <= 0:
                raise OptionError(key, f"expected a positive number, got {getattr(self, key)}")


@dataclass(frozen=True)
class ClipOptions:
    """How a clip becomes tensors: the audio window and spectrogram, the frames sampled and their size."""
    sample_rate: int
    window_s: float
    n_fft: int
    hop_length: int
    n_mels: int = 0          # 0: log-magnitude STFT (OGM-GE); > 0: log-mel in dB
    pad: str = "tile"        # a short clip is repeated (tile) or zero-padded (zero) to the window
    num_frames: int = 1
    image_size: int = 224
    cache_frame_size: int = 0

    @property
    def frame_size(self) -> int:
        return self.cache_frame_size or round(self.image_size * 8 / 7)

    def spectrogram(self) -> LogSpectrogram:
        return LogSpectrogram(self.sample_rate, self.n_fft, self.hop_length, self.n_mels)

    @property
    def window(self) -> int:
        return int(round(self.window_s * self.sample_rate))


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def read_frame(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image  # torchvision is imported when used (seconds)
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as e:
        raise UserError(f"cannot decode JPEG file '{path}': {e}") from None


def read_sample_audio(sample: Sample, sample_rate: int) -> torch.Tensor:
    """The clip's mono waveform at `sample_rate`: from its WAV, or from its video file's audio stream."""
    if sample.video is not None and sample.audio == sample.video:
        return read_video_audio(sample.video, sample_rate)
    return read_clip(sample.audio, sample_rate)


def sample_problem(sample: Sample, decode: bool) -> Problem | None:
    """The first thing wrong with a sample's files. decode=False reads only the WAV header and lists the
    frame folder (cheap, done before training); decode=True decodes every file (`data check`)."""
    if sample.video is not None:
        problem = video_problem(sample.video, decode)
        if problem is not None or sample.audio == sample.video:
            if problem is None and decode:
                try:
                    read_video_audio(sample.video, 16000)
                except UserError as e:
                    return Problem("no audio", str(sample.video), str(e).split("' ", 1)[-1])
            return problem
    if not sample.audio.is_file():
        return Problem("missing file", str(sample.audio))
    try:
        info = soundfile.info(str(sample.audio))
        if decode:
            read_clip(sample.audio, info.samplerate)
        elif info.frames == 0:
            return Problem("undecodable WAV", str(sample.audio), "no samples")
    except Exception as e:
        return Problem("undecodable WAV", str(sample.audio), str(e).splitlines()[0])
    if info.frames < MIN_CLIP_S * info.samplerate:
        return Problem(SHORT_CLIP, str(sample.audio),
                       f"{info.frames} samples = {info.frames / info.samplerate:.3f} s, under {MIN_CLIP_S} s")
    if sample.frames is None:
        return None  # audio-only, or frames from a video checked above
    if not sample.frames.is_dir():
        return Problem("missing frame folder", str(sample.frames))
    frames = frame_files(sample.frames)
    if not frames:
        return Problem("empty frame folder", str(sample.frames), "no .jpg files")
    if decode:
        for path in frames:
            try:
                read_frame(path)
            except UserError as e:
                return Problem("undecodable JPEG", str(path), str(e).split(": ", 1)[-1])
    return None


def scan(samples: list[Sample], decode: bool) -> list[Problem | None]:
    # Decoding is in C (libsndfile, libjpeg) and releases the GIL: threads scale.
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(lambda s: sample_problem(s, decode), samples))


def warn_short_clips(short: list[Problem]) -> None:
    if short:
        print(f"blendtune: warning: {len(short)} clip(s) shorter than {MIN_CLIP_S} s (first: {short[0].path}); "
              "they train padded; `blendtune data check` lists them", file=sys.stderr, flush=True)


def frame_transform(size: int, train: bool) -> v2.Compose:
    """uint8 (3, H, W) -> normalised float (3, size, size): a random crop and flip in training, a resize
    in evaluation (the OGM-GE recipe). The same transform runs in loader workers or on the device."""
    from torchvision.transforms import v2
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *normalize])
    return v2.Compose([v2.Resize((size, size), antialias=True), *normalize])


@dataclass
class FramePayload:
    """Frames a loader worker hands on undecoded (JPEG bytes, `encoded`) or decoded but untransformed
    (uint8 images from the prepared cache), `per_clip` of them per clip in order (data.frames_on=device).
    A batch travels as one tensor (the bytes concatenated, or the images stacked): one shared-memory
    block per batch from a loader worker, not one per frame."""
    data: torch.Tensor           # encoded: uint8 (total bytes,); else uint8 (frames, 3, H, W)
    sizes: list[int]             # encoded: bytes per frame
    encoded: bool
    train: bool
    sources: list[str]           # frame folders, for error messages
    per_clip: int

    @staticmethod
    def of(images: list[torch.Tensor], encoded: bool, train: bool, source: str) -> "FramePayload":
        data = torch.cat(images) if encoded else torch.stack(images)
        return FramePayload(data, [len(im) for im in images] if encoded else [], encoded, train, [source], len(images))

    @staticmethod
    def batch(payloads: list["FramePayload"]) -> "FramePayload":
        first = payloads[0]
        return FramePayload(torch.cat([p.data for p in payloads]), [n for p in payloads for n in p.sizes],
                            first.encoded, first.train, [s for p in payloads for s in p.sources], first.per_clip)

    def images(self) -> list[torch.Tensor]:
        return list(self.data.split(self.sizes)) if self.encoded else list(self.data)

    def to(self, device, non_blocking: bool = False) -> "FramePayload":
        if self.encoded:  # nvjpeg reads the bytes from host memory
            return self
        return FramePayload(self.data.to(device, non_blocking=non_blocking), self.sizes, False, self.train,
                            self.sources, self.per_clip)


class DeviceFrames(torch.nn.Module):
    """In the step, on the training device: decode a batch's JPEGs (torchvision's decode_jpeg, nvjpeg on
    CUDA, batched), then the same crop / flip / resize / normalise as the loader path -> (B, T, 3, S, S)."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("_device", torch.zeros(0), persistent=False)  # where .to() put the module
        self.transforms = {True: frame_transform(image_size, True), False: frame_transform(image_size, False)}

    def forward(self, payload: FramePayload) -> torch.Tensor:
        device = self._device.device
        images = payload.images()
        if payload.encoded:
            from torchvision.io import ImageReadMode, decode_jpeg
            try:
                images = decode_jpeg(images, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                raise UserError(f"cannot decode a JPEG frame of {sorted(set(payload.sources))[:3]}: "
                                f"{str(e).splitlines()[0]}") from None
        transform = self.transforms[payload.train]
        frames = torch.stack([transform(image.to(device)) for image in images])
        return frames.view(-1, payload.per_clip, *frames.shape[1:])


class AudioVisualDataset(Dataset):
    """Item: ({'audio': (1, F, T) spectrogram or (L,) waveform, 'visual': (num_frames, 3, S, S)}, target).

    With `spectrogram_on='device'` the loader returns waveforms and `device_transforms['audio']` turns a
    batch of them into spectrograms in the training step. A file that fails to decode is named; with
    `skip_bad` the item is dropped from its batch instead and counted (`collate_fn`)."""

    def __init__(self, samples: list[Sample], classes: list[str], multilabel: bool, options: ClipOptions,
                 train: bool, skip_bad: bool = False, spectrogram_on: str = "loader", frames_on: str = "loader",
                 cache: ClipCache | None = None):
        self.samples, self.classes, self.multilabel = samples, classes, multilabel
        self.options, self.train, self.skip_bad, self.spectrogram_on = options, train, skip_bad, spectrogram_on
        self.frames_on, self.cache = frames_on, cache
        self.num_classes = len(classes)
        index = {c: i for i, c in enumerate(classes)}
        if multilabel:
            self.targets = torch.zeros(len(samples), len(classes))
            for i, s in enumerate(samples):
                self.targets[i, [index[c] for c in s.labels]] = 1.0
        else:
            self.targets = torch.tensor([index[s.labels[0]] for s in samples], dtype=torch.long)
        groups = [s.group for s in samples]
        self.groups = groups if samples and all(g is not None for g in groups) else None
        self.default_encoders = {"audio": "resnet18", "visual": "resnet18"}
        self.spectrogram = options.spectrogram()
        self.device_transforms = {"audio": self.spectrogram} if spectrogram_on == "device" else {}
        if frames_on == "device":
            self.device_transforms["visual"] = DeviceFrames(options.image_size)
        self.frame_transform = frame_transform(options.image_size, train)

    modalities = property(lambda self: ["audio", "visual"])

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        spec = self.spectrogram(torch.zeros(1, self.options.window))
        o = self.options
        return {"audio": tuple(spec.shape[1:]), "visual": (o.num_frames, 3, o.image_size, o.image_size)}

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices) -> "AudioVisualDataset":
        return AudioVisualDataset([self.samples[int(i)] for i in indices], self.classes, self.multilabel,
                                  self.options, self.train, self.skip_bad, self.spectrogram_on, self.frames_on,
                                  self.cache)

    def for_evaluation(self) -> "AudioVisualDataset":
        """The same samples with evaluation transforms (held-out and train-loss measurements)."""
        return AudioVisualDataset(self.samples, self.classes, self.multilabel, self.options, False,
                                  self.skip_bad, self.spectrogram_on, self.frames_on, self.cache)

    def load(self, sample: Sample) -> dict[str, torch.Tensor]:
        o = self.options
        cached = self.cache.position(sample) if self.cache is not None else None
        wave = self.cache.wave(cached) if cached is not None else read_sample_audio(sample, o.sample_rate)
        wave = fit_to_window(wave, o.window, o.pad).clamp(-1.0, 1.0)
        audio = wave if self.spectrogram_on == "device" else self.spectrogram(wave)
        if cached is not None:  # decoded and resized once, by `blendtune data prepare`
            images = self.cache.frames(cached, pick_frames(self.cache.frame_count(cached), o.num_frames, self.train))
            encoded = False
        elif sample.video is not None:  # torchcodec decodes only the picked frames
            images, encoded = list(read_video_frames(sample.video, o.num_frames, self.train)), False
        else:
            files = frame_files(sample.frames) if sample.frames.is_dir() else []
            if not files:
                raise UserError(f"frame folder '{sample.frames}' is missing or has no .jpg files")
            picked = [files[i] for i in pick_frames(len(files), o.num_frames, self.train)]
            encoded = self.frames_on == "device"  # the step decodes them (nvjpeg on a GPU)
            from torchvision.io import read_file
            images = [read_file(str(p)) for p in picked] if encoded else [read_frame(p) for p in picked]
        if self.frames_on == "device":
            return {"audio": audio, "visual": FramePayload.of(images, encoded, self.train, str(sample.frames))}
        return {"audio": audio, "visual": torch.stack([self.frame_transform(image) for image in images])}

    def __getitem__(self, i: int):
        try:
            return self.load(self.samples[i]), self.targets[i]
        except UserError:
            if self.skip_bad:
                return None
            raise

    @staticmethod
    def collate_fn(items):
        """Batch the good items; the third element counts the bad ones dropped (data.skip_bad)."""
        good = [item for item in items if item is not None]
        if not good:
            return {}, torch.zeros(0, dtype=torch.long), len(items)
        payloads = [inputs.pop("visual") for inputs, _ in good if isinstance(inputs.get("visual"), FramePayload)]
        inputs, targets = default_collate(good)
        if payloads:
            inputs["visual"] = FramePayload.batch(payloads)
        return inputs, targets, len(items) - len(good)


class AudioVisualAdapter(DatasetAdapter):
    """Base of the file-based audio-visual layouts: a subclass only implements `catalog()`."""

    def __init__(self, root: str | None = None, **options):
        self.root = data_root(root)
        paths = {k: options.pop(k) for k in list(options) if k not in ClipOptions.__dataclass_fields__}
        self.paths = paths
        self.options = ClipOptions(**options)

    def catalog(self) -> Catalog:
        raise NotImplementedError

    def good_samples(self, skip_bad: bool, quiet: bool = False) -> tuple[Catalog, list[Sample]]:
        """The catalog and its samples whose files pass the cheap scan (headers, folder listings); bad ones
        refuse the run, or with skip_bad are left out (said once, unless `quiet`). The kept samples' classes
        must cover the test split (`class_coverage`), whatever skip_bad says."""
        catalog = self.catalog()
        found = scan(catalog.samples, decode=False)
        if not quiet:
            warn_short_clips([p for p in found if p is not None and p.kind == SHORT_CLIP])
        found = [None if p is not None and p.kind == SHORT_CLIP else p for p in found]
        problems = catalog.problems + [p for p in found if p is not None]
        good = [s for s, p in zip(catalog.samples, found) if p is None]
        summary = (f"{len(problems)} bad sample(s) in '{self.root}' (first: {problems[0]}); "
                   f"`blendtune data check {self.name} --root {self.root}` lists them all") if problems else ""
        if problems and not skip_bad:
            raise UserError(f"{summary}, data.skip_bad=true trains without them")
        coverage, _ = class_coverage(self.class_counts(good), catalog.classes, str(self.root), catalog.multilabel)
        if coverage:
            raise UserError(f"'{self.root}': {coverage[0]}; `blendtune data check {self.name} --root {self.root}` "
                            "shows the class counts")
        if problems and not quiet:
            print(f"blendtune: skipping {summary}", file=sys.stderr, flush=True)
        return catalog, good

    @staticmethod
    def class_counts(samples: list[Sample]) -> dict[str, Counter]:
        counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
        for s in samples:
            counts[s.split].update(s.labels)
        return counts

    def preflight(self, skip_bad: bool = False) -> None:
        self.good_samples(skip_bad, quiet=True)

    def build(self, skip_bad: bool = False, spectrogram_on: str = "loader", frames_on: str = "loader",
              use_cache: bool = True):
        catalog, good = self.good_samples(skip_bad)
        o = self.options
        cache = fresh_cache(good, self.root, self.name, o.sample_rate, o.frame_size) if use_cache else None
        return tuple(AudioVisualDataset([s for s in good if s.split == split], catalog.classes, catalog.multilabel,
                                        o, train=split == "train", skip_bad=skip_bad, spectrogram_on=spectrogram_on,
                                        frames_on=frames_on, cache=cache)
                     for split in SPLITS)

    def prepare(self, skip_bad: bool = False) -> ClipCache:
        """`blendtune data prepare`: decode every good sample once into the cache training then reads."""
        _, good = self.good_samples(skip_bad)
        if any(s.video is not None for s in good):
            raise UserError(f"data prepare: '{self.root}' has video files; they are decoded directly (only the "
                            "frames picked), the cache is for WAV + JPEG-frame layouts")
        o = self.options
        directory = cache_dir(self.root, self.name, o.sample_rate, o.frame_size)
        build_cache(good, self.root, directory, o.sample_rate, o.frame_size)
        return ClipCache.open(directory, self.root)

    def check(self) -> DataCheck:
        catalog = self.catalog()
        counts = self.class_counts(catalog.samples)
        problems = catalog.problems + [p for p in scan(catalog.samples, decode=True) if p is not None]
        coverage, notes = class_coverage(counts, catalog.classes, str(self.root), catalog.multilabel)
        return DataCheck(self.name, str(self.root), catalog.classes, counts, problems + coverage, notes)
