"""Audio-visual clips read straight from video files (Kinetics-Sounds / VGGSound ship mp4s) with torchcodec.

Frames: the indices come from `pick_frames` over the video's frame count (random sorted subset in
training, evenly spaced in evaluation), and only those frames are decoded, in one batched call.
Audio: the file's audio stream, downmixed to mono and resampled by torchcodec (FFmpeg's swresample).

torchcodec needs FFmpeg's shared libraries (Debian: `apt-get install ffmpeg`; `make test` installs them when
run as root); it is imported on first use, so a machine without them gets a one-line UserError instead of an
ImportError at import time.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from blendtune.data.frames import pick_frames
from blendtune.data.base import Problem
from blendtune.errors import UserError

UNDECODABLE, FRAMELESS, MISSING = "undecodable video", "frameless video", "missing file"

_NO_CUDA_DECODER = re.compile(r"unsupported device|device interface", re.IGNORECASE)
_cuda_decoder_missing = False  # set once a CUDA decoder was asked for and this torchcodec build has none


def _codec():
    """The torchcodec decoders and encoders modules (a UserError if FFmpeg's libraries are missing)."""
    try:
        from torchcodec import decoders, encoders
    except ModuleNotFoundError as e:
        if e.name != "torchcodec":
            raise
        raise UserError("video files need torchcodec, an optional part: pip install 'blendtune[video]'") from None
    except (ImportError, OSError, RuntimeError) as e:
        raise UserError(f"torchcodec cannot load FFmpeg's shared libraries ({_load_failure(e)}); install them: "
                        f"{INSTALL_FFMPEG}") from None
    return decoders, encoders


INSTALL_FFMPEG = "sudo apt-get install ffmpeg (macOS: brew install ffmpeg)"


def _load_failure(e: BaseException) -> str:
    """torchcodec's load error in a line: it tries one libavutil per FFmpeg major it supports (4-8)."""
    tried = list(dict.fromkeys(re.findall(r"libavutil\.so\.\d+", str(e))))
    return f"none of {', '.join(tried)} loads" if tried else _reason(e)


def _reason(e: BaseException) -> str:
    """The first line of an error, without torchcodec's C++ location prefix (`fn, /path/file.cpp:51, `)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0].strip() if lines else type(e).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", first)


def _cannot_decode(path, e: BaseException) -> UserError:
    return UserError(f"cannot decode video file '{path}': {_reason(e)}")


def _no_frames(path) -> UserError:
    return UserError(f"video file '{path}' has no frames")


def _decoder_device(device: str | torch.device) -> str:
    device = str(device)
    return device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def _open_video(path, device: str = "cpu"):
    """A VideoDecoder on `path` (exact seek mode: the frame count comes from a scan of the packets, no
    decoding). Raises UserError: cannot decode (not a container, truncated, ...) or has no frames."""
    decoders, _ = _codec()
    try:
        decoder = decoders.VideoDecoder(str(path), device=device)
    except ValueError:
        # Raised after the container opened: no video stream, or one without frames/timestamps.
        raise _no_frames(path) from None
    except RuntimeError as e:
        if device != "cpu" and _NO_CUDA_DECODER.search(str(e)):
            raise  # no CUDA decoder in this torchcodec build: the caller falls back to CPU
        # The exact-mode scan fails on a container with no streams at all; the header tells.
        try:
            header = decoders.VideoDecoder(str(path), seek_mode="approximate")
        except ValueError:
            raise _no_frames(path) from None
        except Exception:
            raise _cannot_decode(path, e) from None
        if not header.metadata.num_frames:
            raise _no_frames(path) from None
        raise _cannot_decode(path, e) from None
    if len(decoder) == 0:
        raise _no_frames(path)
    return decoder


def _frames_at(decoder, path, indices: list[int]) -> torch.Tensor:
    try:
        return decoder.get_frames_at(indices).data
    except Exception as e:
        raise _cannot_decode(path, e) from None


def read_video_frames(path, num_frames: int, train: bool, device: str = "cpu") -> torch.Tensor:
    """uint8 (num_frames, 3, H, W) frames of the video at `path`, picked by `pick_frames` (uses torch's RNG
    in training). device="cuda..." decodes with torchcodec's CUDA decoder (NVDEC) when torch.cuda is
    available, and the frames come back on that device; a torchcodec build without CUDA (the PyPI
    wheel) decodes on CPU and moves the frames there, warning once. Without CUDA: the CPU decoder."""
    global _cuda_decoder_missing
    want = _decoder_device(device)
    try:
        decoder = _open_video(path, "cpu" if _cuda_decoder_missing else want)
    except RuntimeError as e:  # only a CUDA decoder that this torchcodec build lacks gets here
        _cuda_decoder_missing = True
        print(f"blendtune: warning: torchcodec cannot decode on {want} ({_reason(e)}); decoding video on CPU "
              "and copying the frames (install torchcodec's CUDA build for GPU decoding)", file=sys.stderr, flush=True)
        decoder = _open_video(path, "cpu")
    frames = _frames_at(decoder, path, pick_frames(len(decoder), num_frames, train))
    return frames.to(want)


def read_video_audio(path, sample_rate: int) -> torch.Tensor:
    """float32 mono (samples,) of the audio stream of `path`, resampled to `sample_rate` by torchcodec."""
    decoders, _ = _codec()
    try:
        decoder = decoders.AudioDecoder(str(path), sample_rate=sample_rate, num_channels=1)
    except ValueError:
        raise UserError(f"video file '{path}' has no audio stream") from None
    except RuntimeError as e:
        raise _cannot_decode(path, e) from None
    try:
        samples = decoder.get_all_samples().data
    except Exception as e:
        raise _cannot_decode(path, e) from None
    return samples.mean(0).to(torch.float32)


def video_problem(path, decode: bool) -> Problem | None:
    """The first thing wrong with a video file, for `blendtune data check`. decode=False opens the
    container and reads its metadata (a packet scan, nothing decoded: cheap, before training);
    decode=True also decodes the first, middle and last frames."""
    if not Path(path).is_file():
        return Problem(MISSING, str(path))
    try:
        decoder = _open_video(path, "cpu")
        if decode:
            n = len(decoder)
            _frames_at(decoder, path, sorted({0, n // 2, n - 1}))
    except UserError as e:
        message = str(e)
        if message.endswith("has no frames"):
            return Problem(FRAMELESS, str(path), "no video stream or no frames")
        return Problem(UNDECODABLE, str(path), message.split("': ", 1)[-1])
    return None


def write_test_video(path, frames: torch.Tensor | None, fps: int, audio: torch.Tensor | None = None,
                     sample_rate: int | None = None) -> None:
    """Encode a small test file (for tests): frames uint8 (T, 3, H, W) with even H and W, at `fps`; audio
    float in [-1, 1], (samples,) or (channels, samples), at `sample_rate`. frames=None writes an
    audio-only file. The streams are encoded by torchcodec's VideoEncoder (the container's default
    codec: H.264 with Debian's FFmpeg, else mpeg4) and AudioEncoder (AAC); a file with both is muxed
    by the `ffmpeg` command line (`-c copy`, no re-encoding), since torchcodec writes one stream per file."""
    _, encoders = _codec()
    path = Path(path)
    if frames is None and audio is None:
        raise ValueError("write_test_video needs frames, audio or both")
    if audio is not None and sample_rate is None:
        raise ValueError("audio needs a sample_rate")
    audio = audio.to(torch.float32).cpu() if audio is not None else None
    if audio is None:
        encoders.VideoEncoder(frames.cpu(), frame_rate=fps).to_file(str(path))
        return
    if frames is None:
        encoders.AudioEncoder(audio, sample_rate=sample_rate).to_file(str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        video_file, audio_file = os.path.join(tmp, "video.mp4"), os.path.join(tmp, "audio.m4a")
        encoders.VideoEncoder(frames.cpu(), frame_rate=fps).to_file(video_file)
        encoders.AudioEncoder(audio, sample_rate=sample_rate).to_file(audio_file)
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", video_file, "-i", audio_file,
                        "-map", "0:v", "-map", "1:a", "-c", "copy", str(path)], check=True, capture_output=True)
