"""Reading clips from video files with torchcodec (blendtune.data.video) on tiny generated mp4s.

Test files come from write_test_video: torchcodec's VideoEncoder (H.264 with Debian's FFmpeg) and
AudioEncoder (AAC), muxed by the ffmpeg command line. Colours survive RGB -> YUV 4:2:0 -> H.264 -> RGB
within COLOUR_TOLERANCE levels (a constant frame loses nothing to chroma subsampling; what is left is
the limited-range YUV rounding and quantisation of flat blocks, measured at <= 3).

Every test needs FFmpeg (its shared libraries for torchcodec, its CLI to mux the test files): without it they
are skipped with what is missing and the command to install it, except with CI=true, where they fail (CI
installs FFmpeg, so a skip there would hide that these tests never ran)."""
import math
import os
import shutil

import pytest
import torch

from blendtune.data.audiovisual import pick_frames
from blendtune.errors import UserError

from blendtune.data import video

FRAMES, SIZE, FPS = 10, 32, 10
COLOUR_TOLERANCE = 8  # max |mean decoded - encoded| per channel, in uint8 levels
# Frame i has its own constant colour; any two differ by >= 40 levels in some channel.
COLOURS = torch.tensor([[(40 * i + 20) % 256, 230 - 20 * i, (90 * i + 30) % 256] for i in range(FRAMES)])


def ffmpeg_missing() -> str | None:
    """What of FFmpeg this machine lacks, with the command to install it; None when all is there."""
    try:
        video._codec()
    except UserError as e:
        return str(e)
    if shutil.which("ffmpeg") is None:
        return f"the ffmpeg command line (it muxes the test videos) is not on PATH; install it: {video.INSTALL_FFMPEG}"
    return None


@pytest.fixture(scope="module", autouse=True)
def needs_ffmpeg():
    """Set up before any other fixture of this module (autouse, module scope): skip or, under CI, fail."""
    missing = ffmpeg_missing()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the video tests cannot run: {missing}", pytrace=False)
    if missing:
        pytest.skip(missing)


def constant_frames(colours=COLOURS, size=SIZE) -> torch.Tensor:
    return colours[:, :, None, None].expand(-1, 3, size, size).to(torch.uint8).contiguous()


def sine(freq: float, seconds: float, rate: int, channels: int = 1) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (0.5 * torch.sin(2 * math.pi * freq * t)).repeat(channels, 1)


def frame_indices(frames: torch.Tensor) -> list[int]:
    """Which encoded frame each decoded frame is: the nearest colour, checked to be within tolerance."""
    means = frames.float().mean((2, 3))
    dist = (means[:, None, :] - COLOURS[None].float()).abs().amax(-1)  # (decoded, encoded)
    best = dist.argmin(1)
    assert (dist.min(1).values <= COLOUR_TOLERANCE).all(), dist.min(1).values
    return best.tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    paths = {name: root / f"{name}.mp4" for name in ("silent", "with_audio", "audio_only")}
    video.write_test_video(paths["silent"], constant_frames(), FPS)
    video.write_test_video(paths["with_audio"], constant_frames(), FPS, audio=sine(440, 1.0, 16000, channels=2),
                           sample_rate=16000)
    video.write_test_video(paths["audio_only"], None, FPS, audio=sine(440, 1.0, 16000), sample_rate=16000)
    paths["garbage"] = root / "garbage.mp4"
    paths["garbage"].write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video\n" * 20)
    data = paths["silent"].read_bytes()
    paths["truncated"] = root / "truncated.mp4"  # moov atom at the end: cut, the container no longer opens
    paths["truncated"].write_bytes(data[: len(data) // 2])
    return paths


def test_written_clips_have_the_streams_asked_for(clips):
    from torchcodec.decoders import AudioDecoder, VideoDecoder
    decoder = VideoDecoder(str(clips["with_audio"]))
    assert len(decoder) == FRAMES and (decoder.metadata.width, decoder.metadata.height) == (SIZE, SIZE)
    assert decoder.metadata.codec in ("h264", "mpeg4")
    assert AudioDecoder(str(clips["with_audio"])).metadata.num_channels == 2


@pytest.mark.parametrize("name", ["silent", "with_audio"])
def test_evaluation_reads_evenly_spaced_frames_of_the_right_colour(clips, name):
    frames = video.read_video_frames(clips[name], 4, train=False)
    assert frames.shape == (4, 3, SIZE, SIZE) and frames.dtype == torch.uint8 and frames.device.type == "cpu"
    assert frame_indices(frames) == [0, 3, 6, 9] == pick_frames(FRAMES, 4, False)
    expected = COLOURS[[0, 3, 6, 9]].float()
    assert (frames.float().mean((2, 3)) - expected).abs().max() <= COLOUR_TOLERANCE
    assert torch.equal(frames, video.read_video_frames(clips[name], 4, train=False))  # deterministic


def test_training_reads_the_sorted_random_frames_pick_frames_draws(clips):
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        expected = pick_frames(FRAMES, 3, True)
        torch.manual_seed(seed)
        got = frame_indices(video.read_video_frames(clips["silent"], 3, train=True))
        assert got == expected == sorted(got)
        seen.add(tuple(got))
    assert len(seen) > 1  # varies with the seed


def test_more_frames_than_the_video_has_repeat_some(clips):
    torch.manual_seed(0)
    frames = video.read_video_frames(clips["silent"], FRAMES + 5, train=True)
    got = frame_indices(frames)
    assert frames.shape[0] == FRAMES + 5 and got == sorted(got) and len(set(got)) < len(got)


def test_only_the_picked_frames_are_decoded_in_one_batched_call(clips, monkeypatch):
    from torchcodec.decoders import VideoDecoder
    calls = []
    batched = VideoDecoder.get_frames_at
    monkeypatch.setattr(VideoDecoder, "get_frames_at", lambda self, idx: calls.append(list(idx)) or batched(self, idx))
    for name in ("__getitem__", "get_frame_at", "get_frames_in_range", "get_frames_played_in_range"):
        monkeypatch.setattr(VideoDecoder, name, lambda *a, **k: pytest.fail("decoded frame by frame"))
    video.read_video_frames(clips["silent"], 2, train=False)
    assert calls == [[0, 9]]


def test_audio_is_mono_at_the_requested_rate_and_peaks_at_the_sine(clips):
    for rate in (8000, 22050):
        wave = video.read_video_audio(clips["with_audio"], rate)
        assert wave.dtype == torch.float32 and wave.dim() == 1
        assert abs(len(wave) - rate) < 0.1 * rate  # 1 s (AAC adds a frame of padding)
        spectrum = torch.fft.rfft(wave * torch.hann_window(len(wave))).abs()
        peak = spectrum.argmax().item() * rate / len(wave)
        assert abs(peak - 440) < 5, peak  # 220 or 880 if the rate were wrong


@pytest.mark.parametrize("name", ["garbage", "truncated"])
def test_an_undecodable_file_is_one_line_naming_it(clips, name):
    for read in (lambda p: video.read_video_frames(p, 2, train=False), lambda p: video.read_video_audio(p, 8000)):
        with pytest.raises(UserError) as e:
            read(clips[name])
        message = str(e.value)
        assert message.startswith(f"cannot decode video file '{clips[name]}': ") and "\n" not in message
        assert ".cpp" not in message  # torchcodec's C++ location is dropped


def test_an_audio_only_file_has_no_frames(clips):
    with pytest.raises(UserError) as e:
        video.read_video_frames(clips["audio_only"], 2, train=False)
    assert str(e.value) == f"video file '{clips['audio_only']}' has no frames"


def test_a_video_without_audio_has_no_audio_stream(clips):
    with pytest.raises(UserError) as e:
        video.read_video_audio(clips["silent"], 8000)
    assert str(e.value) == f"video file '{clips['silent']}' has no audio stream"


def test_video_problem_kinds(clips, tmp_path):
    for decode in (False, True):
        assert video.video_problem(clips["with_audio"], decode) is None
        assert video.video_problem(tmp_path / "nope.mp4", decode).kind == "missing file"
        assert video.video_problem(clips["garbage"], decode).kind == "undecodable video"
        assert video.video_problem(clips["truncated"], decode).kind == "undecodable video"
        assert video.video_problem(clips["audio_only"], decode).kind == "frameless video"
    problem = video.video_problem(clips["garbage"], True)
    assert problem.path == str(clips["garbage"]) and problem.detail and "\n" not in problem.detail


def test_only_decode_true_catches_a_cut_stream_behind_an_intact_header(tmp_path):
    # moov first (faststart): the cut file opens and its packets scan, but the last frames do not decode.
    from torchcodec.encoders import VideoEncoder
    full, cut = tmp_path / "full.mp4", tmp_path / "cut.mp4"
    noise = torch.randint(0, 256, (FRAMES, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    VideoEncoder(noise, frame_rate=FPS).to_file(str(full), extra_options={"movflags": "+faststart"})
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert video.video_problem(cut, decode=False) is None
    problem = video.video_problem(cut, decode=True)
    assert problem.kind == "undecodable video" and "\n" not in problem.detail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_frames_match_the_cpu_ones(clips):
    cpu = video.read_video_frames(clips["silent"], 4, train=False)
    gpu = video.read_video_frames(clips["silent"], 4, train=False, device="cuda")
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape and gpu.dtype == torch.uint8
    assert (gpu.cpu().float() - cpu.float()).abs().mean() <= COLOUR_TOLERANCE


# ---- the av_csv layout with video files (Kinetics-Sounds / VGGSound as distributed) -----------------
def _video_tree(root, wav_for=()):
    import numpy as np
    from blendtune.data.video import write_test_video
    labels = ["dog", "drum", "rain"]
    lines = ["id,label,split"]
    (root / "video").mkdir(parents=True)
    for i in range(9):
        c = i % 3
        frames = torch.full((6, 3, 32, 32), 40 + 80 * c, dtype=torch.uint8)
        t = torch.arange(8000) / 16000
        audio = 0.5 * torch.sin(2 * torch.pi * (300 + 300 * c) * t)
        write_test_video(root / "video" / f"clip{i}.mp4", frames, fps=12, audio=audio[None], sample_rate=16000)
        if i in wav_for:
            import soundfile
            (root / "audio").mkdir(exist_ok=True)
            soundfile.write(root / "audio" / f"clip{i}.wav", np.zeros(8000, dtype=np.float32), 16000)
        lines.append(f"clip{i},{labels[c]},{'test' if i >= 6 else 'train'}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


def _video_tiny():
    from conftest import AV_CSV_TINY
    return [*AV_CSV_TINY, "data.batch_size=3", "data.held_out_ratio=0"]  # later keys win


def test_av_csv_reads_frames_and_audio_from_video_files(tmp_path):
    from blendtune.config import load_config
    from blendtune.build import build_trainer
    root = _video_tree(tmp_path / "ks", wav_for=(0,))
    trainer = build_trainer(load_config(None, [*_video_tiny(), f"data.root={root}"]))
    samples = {s.id: s for s in trainer.splits.train.samples}
    assert samples["clip1"].video is not None and samples["clip1"].audio == samples["clip1"].video  # audio from mp4
    assert samples["clip0"].audio.suffix == ".wav"                                                   # its WAV wins
    evaluation = trainer.splits.test
    inputs, target = evaluation[0]
    assert inputs["visual"].shape == (2, 3, 32, 32) and inputs["audio"].shape[0] == 1
    # the decoded frame is the encoded colour (normalised): clip6 is class 0, pixel value 40
    from blendtune.data.audiovisual import IMAGENET_MEAN, IMAGENET_STD
    expected = (40 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert abs(inputs["visual"][:, 0].mean().item() - expected) < 8 / 255 / IMAGENET_STD[0]
    assert torch.isfinite(torch.tensor(trainer.fit()["loss/objective"]))


def test_data_check_names_undecodable_videos(tmp_path, capfd):
    from conftest import cli_in_process
    root = _video_tree(tmp_path / "ks")
    (root / "video" / "clip4.mp4").write_bytes(b"not a video at all")
    proc = cli_in_process(capfd, "data", "check", "av_csv", "--root", root)
    assert proc.returncode == 1 and "undecodable video" in proc.stdout and "clip4.mp4" in proc.stdout
