"""Tests for the ``vlmrm-fast`` command line (``vlmrm_fast.cli``).

They run the tiny random-weights model on CPU against a small image folder and a short
video generated in ``tmp_path``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmrm_fast import CLIPReward, cli, frame_files, score_command
from vlmrm_fast.argtypes import require_cli_extra

Image = pytest.importorskip("PIL.Image", reason="the CLI needs pillow: pip install 'vlmrm-fast[cli]'")

# The tiny model is random-init on purpose, which the core warns about.
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights:UserWarning")

TINY = ["--model", "vlmrm-tiny", "--pretrained", "none", "--device", "cpu", "--no-progress"]

# Natural order; frame3 and frame20 hold the same picture; frame9/frame10 are larger.
FRAME_NAMES = ["frame1", "frame2", "frame3", "frame9", "frame10", "frame11", "frame20"]
LARGE = {"frame9", "frame10"}


def _picture(name: str) -> np.ndarray:
    """A small RGB picture, distinct per name except frame3 == frame20."""
    height, width = (36, 50) if name in LARGE else (30, 40)
    seed = 3 if name == "frame20" else int(name.removeprefix("frame"))
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """7 PNG frames in two sizes, written in reverse order, and files that are not frames."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in reversed(FRAME_NAMES):
        Image.fromarray(_picture(name)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not a frame")
    (folder / "._frame1.png").write_bytes(b"macOS metadata, not a PNG")
    Image.fromarray(_picture("frame1")).save(folder / "frame1.rewards.png")  # an old plot
    return folder


@pytest.fixture
def video(tmp_path: Path) -> Path:
    """A 6-frame 64x48 mp4 at 10 fps."""
    iio = pytest.importorskip("imageio.v3", reason="needs imageio: pip install 'vlmrm-fast[cli]'")
    frames = np.random.default_rng(0).integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    path = tmp_path / "clip.mp4"
    try:
        iio.imwrite(path, frames, plugin="FFMPEG", fps=10)
    except Exception as exc:  # any writer failure means no ffmpeg here, not a CLI bug
        pytest.skip(f"cannot write an mp4 with imageio's ffmpeg plugin ({exc}); install imageio-ffmpeg")
    return path


def score(argv: list[str]) -> int:
    """Run ``vlmrm-fast score ARGV``; return the exit code."""
    return cli.main(["score", *argv])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_folder_natural_order(image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    code = score([str(image_folder), "--goal", "a red square", "--batch-size", "2", *TINY])

    assert code == 0, capsys.readouterr().err
    rows = _read_csv(image_folder.parent / "frames.rewards.csv")
    assert [r["frame"] for r in rows] == [str(i) for i in range(len(FRAME_NAMES))]
    assert [r["source"] for r in rows] == [f"{name}.png" for name in FRAME_NAMES]
    rewards = {r["source"]: float(r["reward"]) for r in rows}
    assert all(math.isfinite(r) for r in rewards.values())
    assert rewards["frame3.png"] == pytest.approx(rewards["frame20.png"], abs=1e-5)
    summary = capsys.readouterr().out
    assert "scored 7 frames" in summary and "frames.rewards.csv" in summary


def test_score_to_standard_output(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `--out -`, as Unix tools take it: the CSV on stdout (to pipe), the summary on stderr, no file written.
    assert score([str(image_folder), "--goal", "a red square", "--out", "-", *TINY]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert "\r" not in out  # lines end as a pipe's tools expect
    assert [r["source"] for r in rows] == [f"{name}.png" for name in FRAME_NAMES]
    assert "scored 7 frames" in err and "wrote the CSV to standard output" in err and "scored" not in out
    assert not (image_folder.parent / "frames.rewards.csv").exists() and not (Path.cwd() / "-").exists()
    assert score([str(image_folder), "--goal", "a", "--out", "-", "--plot", *TINY]) == 2
    assert "give it one, --plot=FILE.png" in capsys.readouterr().err
    plot = tmp_path / "r.png"
    assert score([str(image_folder), "--goal", "a", "--out", "-", f"--plot={plot}", *TINY]) == 0
    assert plot.exists() and f"wrote the CSV to standard output, {plot}" in capsys.readouterr().err


def test_score_refuses_a_prompt_that_is_not_text(image_folder: Path, tmp_path: Path, capsys) -> None:
    # `--goal café` typed in Latin-1 where the locale says UTF-8: Python's argv holds 'caf\udce9'. It was scored as
    # whatever the tokenizer made of it, and --plot then failed in matplotlib with a page of its signatures.
    out = tmp_path / "r.csv"
    assert score([str(image_folder), "--goal", "caf\udce9", "--out", str(out), "--plot", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.endswith("is a byte that is not UTF-8, from a terminal or file in another encoding): retype it as "
                        "UTF-8.\n") and err.count("\n") == 1, err
    assert not out.exists()


def test_score_refuses_a_plot_among_the_frames_it_scores(image_folder: Path, capsys) -> None:
    # A later score of the folder read such a plot as a frame (one more reward, from the plot) without a word.
    plot = image_folder / "plot.png"
    assert score([str(image_folder), "--goal", "a red square", f"--plot={plot}", *TINY]) == 2
    assert capsys.readouterr().err == (f"vlmrm-fast: error: --plot '{plot}' is in the folder being scored, where a "
                                       "later score of it would read the plot as a frame: name it "
                                       f"{image_folder / 'plot.rewards.png'} (skipped as a frame), or write it elsewhere\n")
    assert not plot.exists()
    assert score([str(image_folder), "--goal", "a red square", f"--plot={image_folder / 'plot.rewards.png'}", *TINY]) == 0
    frames = len(frame_files.list_images(image_folder))
    capsys.readouterr()
    assert score([str(image_folder), "--goal", "a red square", "--out", "-", *TINY]) == 0
    assert capsys.readouterr().out.count("\n") == 1 + frames


def test_score_to_a_pipe_its_reader_closed(image_folder: Path, monkeypatch, capsys) -> None:
    # `vlmrm-fast score ... --out - | head -3`: head exits, the next write raises BrokenPipeError. A Unix
    # tool ends quietly then, with the code a shell gives SIGPIPE (141), not an error message or a traceback.
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert score([str(image_folder), "--goal", "a red square", "--out", "-", *TINY]) == 141
    assert "Broken pipe" not in capsys.readouterr().err
    # Another broken pipe (a socket, a subprocess of a library) is an error to report, not a reader gone.
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(score_command, "score_frames", broken)
    assert score([str(image_folder), "--goal", "a red square", *TINY]) == 2
    assert "Broken pipe" in capsys.readouterr().err


@pytest.mark.parametrize("prompts,api", [
    (["--goal", "a red square"], dict(goal="a red square")),
    (["--goal", "a red square", "--goal", "a red box", "--baseline", "a square", "--alpha", "0.5"],
     dict(goal=["a red square", "a red box"], baseline="a square", alpha=0.5)),
    # The pictures are not square: open_clip's crop and the paper's squash give other rewards.
    (["--goal", "a red square", "--preprocess", "openclip"], dict(goal="a red square", preprocess="openclip")),
], ids=["one-goal", "goals-baseline-alpha", "openclip-preprocess"])
def test_rewards_match_the_api(image_folder: Path, tmp_path: Path, prompts, api) -> None:
    out = tmp_path / "r.csv"
    torch.manual_seed(0)  # the same random weights in the CLI and here
    assert score([str(image_folder), *prompts, "--out", str(out), *TINY]) == 0
    torch.manual_seed(0)
    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, device="cpu", **api)

    expected = [float(rm(_picture(name)[None])[0]) for name in FRAME_NAMES]
    assert [float(r["reward"]) for r in _read_csv(out)] == pytest.approx(expected, abs=1e-5)


def test_score_video_with_plot(video: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "rewards.csv"
    argv = [str(video), "--goal", "a cat", "--goal", "a kitten", "--baseline", "an animal"]
    code = score([*argv, "--alpha", "0.5", "--out", str(out), "--plot", *TINY])

    assert code == 0, capsys.readouterr().err
    rows = _read_csv(out)
    assert len(rows) == 6
    assert [float(r["source"]) for r in rows] == pytest.approx([i / 10 for i in range(6)])
    assert all(math.isfinite(float(r["reward"])) for r in rows)
    png = (out.parent / "rewards.rewards.png").read_bytes()  # a name later runs over a folder skip
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_the_command_line_parser_and_the_package_load_without_torch() -> None:
    # `vlmrm-fast --help` and usage errors answer in well under a second; importing torch and
    # open_clip takes seconds. A fresh interpreter, so that this session's imports do not count.
    code = (
        "import sys, vlmrm_fast; from vlmrm_fast.cli import build_parser, main\n"
        "assert main(['--help']) == 0 and main(['train', '--help']) == 0 and main(['bench', '--nope']) == 2\n"
        "assert main(['--version']) == 0\n"
        # Not triton: the package loads it before MuJoCo can render (vlmrm_fast/llvm_clash.py; 0.15 s).
        "heavy = sorted(m for m in ('torch', 'open_clip', 'stable_baselines3', 'mujoco') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert vlmrm_fast.CLIPReward.__name__ == 'CLIPReward' and 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_version_names_the_package_and_its_torch(capsys: pytest.CaptureFixture) -> None:
    import torch

    import vlmrm_fast
    from vlmrm_fast.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"vlmrm-fast {vlmrm_fast.__version__} (torch {torch.__version__}")


def test_the_lazy_package_names_all_resolve() -> None:
    import vlmrm_fast

    missing = [name for name in vlmrm_fast.__all__ if not hasattr(vlmrm_fast, name)]
    assert not missing and set(vlmrm_fast.__all__) <= set(dir(vlmrm_fast))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlmrm_fast.nope  # noqa: B018


def test_bench_precision_names_match_the_dtypes_it_runs() -> None:
    from vlmrm_fast.profiler import options, run

    assert (*run.DTYPES, *run.QUANTIZED) == options.PRECISIONS


GIF_DURATIONS_MS = [500, 100, 100, 300]  # ffmpeg's default constant-rate output repeats frame 0 here


@pytest.fixture
def uneven_gif(tmp_path: Path) -> Path:
    """A 4-frame GIF of flat grey levels whose frames last 0.5, 0.1, 0.1 and 0.3 s."""
    frames = [Image.fromarray(np.full((24, 32, 3), level, np.uint8)) for level in (0, 80, 160, 240)]
    path = tmp_path / "uneven.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_DURATIONS_MS, loop=0)
    return path


def test_a_gif_with_uneven_frame_durations_gives_one_row_per_frame_at_its_time(
    uneven_gif: Path, tmp_path: Path
) -> None:
    pytest.importorskip("imageio_ffmpeg", reason="needs imageio-ffmpeg: pip install 'vlmrm-fast[cli]'")
    out = tmp_path / "r.csv"
    torch.manual_seed(0)
    assert score([str(uneven_gif), "--goal", "a grey square", "--out", str(out), *TINY]) == 0
    torch.manual_seed(0)
    rm = CLIPReward.from_pretrained("vlmrm-tiny", None, device="cpu", goal="a grey square")

    rows = _read_csv(out)
    starts = np.cumsum([0, *GIF_DURATIONS_MS[:-1]]) / 1000
    assert [float(r["source"]) for r in rows] == pytest.approx(starts.tolist())
    expected = [float(rm(np.full((1, 24, 32, 3), level, np.uint8))[0]) for level in (0, 80, 160, 240)]
    assert [float(r["reward"]) for r in rows] == pytest.approx(expected, abs=1e-5)


def test_the_frame_count_of_a_video_with_timestamps_is_theirs(video: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The progress bar's total: one frame per timestamp the container lists, not fps x duration (which a
    # variable-rate video, or a GIF of uneven frame durations, does not have).
    listed = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.55]
    monkeypatch.setattr(frame_files, "_list_packets", lambda ffmpeg, path: (listed, None))
    source = frame_files.VideoFile.open(video)
    assert source.timestamps == listed and source.total == len(listed)


def test_video_labels_fall_back_to_frame_over_fps_and_a_count_mismatch_is_reported(
    video: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frame_files, "_list_packets", lambda ffmpeg, path: (None, None))
    source = frame_files.VideoFile.open(video)
    assert source.timestamps is None and source.total == 6
    assert [label for _, label in source] == [f"{i / 10:.4f}" for i in range(6)]

    source.timestamps = [i / 10 for i in range(7)]  # the container listing a frame the decoder dropped
    with pytest.warns(UserWarning, match="frames are missing .* could not decode 1 of the 7 frames .* may be off"):
        assert len(list(source)) == 6
    source.timestamps = [i / 10 for i in range(5)]  # more frames decoded than listed: only their times are in doubt
    with pytest.warns(UserWarning, match="decoded 6 frames .* lists 5, so the times") as caught:
        assert len(list(source)) == 6
    assert not any("missing" in str(w.message) for w in caught)


@pytest.mark.parametrize("container,codec", [("mkv", "ffv1"), ("mp4", "mpeg4")])
def test_a_video_cut_short_is_reported_as_missing_frames(tmp_path: Path, container: str, codec: str) -> None:
    # A download or copy cut short: the packets before the cut decode, and the container lists only those,
    # so the frame count agrees; only ffmpeg's read error ("File ended prematurely", "partial file") tells.
    ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="needs imageio-ffmpeg: pip install 'vlmrm-fast[cli]'")
    whole, cut = tmp_path / f"whole.{container}", tmp_path / f"cut.{container}"
    command = [ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i",
               "testsrc=size=64x48:rate=10,noise=alls=60:allf=t", "-frames:v", "12", "-c:v", codec,
               *(["-movflags", "+faststart"] if container == "mp4" else []), str(whole)]  # index first, as streamed
    if subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip(f"this ffmpeg cannot write {codec} in {container}")
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    source = frame_files.VideoFile.open(whole)
    assert source.read_error is None and source.total == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert len(list(source)) == 12
    source = frame_files.VideoFile.open(cut)
    with pytest.warns(UserWarning, match=f"frames are missing from '{re.escape(str(cut))}': it may be cut short or "
                                         "damaged .ffmpeg reports: .*(partial file|ended prematurely)") as caught:
        decoded = len(list(source))
    messages = [str(w.message) for w in caught if w.category is UserWarning]
    assert 0 < decoded < 12 and len(messages) == 1 and f"scored the {decoded} frames it decoded" in messages[0]


def test_a_read_error_that_loses_no_frame_is_not_called_missing_frames(tmp_path: Path) -> None:
    # A demuxer's complaint about another stream, with every listed frame decoded: no frame is missing.
    source = frame_files.VideoFile(tmp_path / "v.mkv", fps=10.0, size=(4, 4), total=3,
                                   timestamps=[0.0, 0.1, 0.2], read_error="Unknown codec for stream 1")
    assert source._missing_frames(3) is None
    source.read_error = "stream 0, offset 0x346d5: partial file"  # cut short: the listing stops at the cut too
    assert "frames are missing" in source._missing_frames(3)
    source.read_error = "Unknown codec for stream 1"
    assert "frames are missing" in source._missing_frames(2)  # fewer decoded: missing, by the count, not that error
    assert "ffmpeg could not decode 1 of the 3 frames" in source._missing_frames(2)


def test_ffmpegs_read_error_is_its_last_line_without_the_prefix() -> None:
    stderr = ("[h264 @ 0x55c1961e76c0] Invalid NAL unit size (6228 > 1938).\n"
              "[in#0/mov,mp4,m4a,3gp,3g2,mj2 @ 0x55c19613e080] stream 0, offset 0x346d5: partial file\n\n")
    assert frame_files._last_error(stderr) == "stream 0, offset 0x346d5: partial file"
    assert frame_files._last_error("") is None and frame_files._last_error(None) is None


@pytest.mark.parametrize(("version", "option"), [
    ("9.0.2-17-g2a571b6068-20260930", "-fps_mode"),
    ("n5.1.2", "-fps_mode"),
    ("N-113547-g0f9ca8d8b6", "-fps_mode"),  # a development build
    ("5.0.1", "-vsync"),
    ("4.4.2-0ubuntu0.22.04.1", "-vsync"),
])
def test_passthrough_option_follows_the_ffmpeg_version(version: str, option: str) -> None:
    class FakeFFmpeg:
        @staticmethod
        def get_ffmpeg_version() -> str:
            return version

    assert frame_files._passthrough_option(FakeFFmpeg) == [option, "passthrough"]


def test_a_bare_plot_beside_the_csv_in_the_frames_folder_is_not_scored_next_time(image_folder: Path) -> None:
    from vlmrm_fast.score_command import _plot_path

    assert _plot_path("", Path("clip.rewards.csv")) == Path("clip.rewards.png")
    argv = [str(image_folder), "--goal", "x", "--out", str(image_folder / "rewards.csv"), "--plot", *TINY]
    assert score(argv) == 0 and (image_folder / "rewards.rewards.png").exists()
    assert score(argv) == 0
    assert len(_read_csv(image_folder / "rewards.csv")) == len(FRAME_NAMES)


def test_plot_to_given_path(image_folder: Path, tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "r.png"
    argv = [str(image_folder / "frame2.png"), "--goal", "x", f"--plot={plot}", *TINY]

    assert score(argv) == 0
    assert len(_read_csv(image_folder / "frame2.rewards.csv")) == 1
    assert plot.stat().st_size > 0


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp / "missing.mp4", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no images found"),
        (lambda tmp: (tmp / "a.txt").write_text("x") and tmp / "a.txt", "unsupported file type"),
        (lambda tmp: (tmp / "bad.mp4").write_bytes(b"\0" * 64) and tmp / "bad.mp4", "cannot read video"),
    ],
    ids=["missing", "empty-folder", "unsupported", "corrupt-video"],
)
def test_bad_input_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture, make_path, message: str) -> None:
    code = score([str(make_path(tmp_path)), "--goal", "x", *TINY])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("vlmrm-fast: error: ") and message in err
    assert "Traceback" not in err


def test_score_announces_the_one_off_onnx_export_once(image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime", reason="the CPU auto backend is torch without the export extra")
    pytest.importorskip("onnx", reason="the CPU auto backend is torch without the export extra")

    assert score([str(image_folder), "--goal", "x", *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("vlmrm-fast: exporting the vision tower to ONNX") == 1, err
    assert err.count("ONNX Runtime session ready in") == 1, err
    # --backend torch skips it, as the announcement says.
    assert score([str(image_folder), "--goal", "x", *TINY, "--backend", "torch"]) == 0
    assert "exporting" not in capsys.readouterr().err


def test_a_file_without_a_video_stream_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="needs imageio-ffmpeg: pip install 'vlmrm-fast[cli]'")
    audio = tmp_path / "sound.mp4"
    subprocess.run([ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=d=0.2", str(audio)], check=True)

    assert score([str(audio), "--goal", "x", *TINY]) == 2
    assert "has no video stream" in capsys.readouterr().err


def test_corrupt_image_names_the_file(image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    (image_folder / "frame5.png").write_bytes(b"not a png")

    assert score([str(image_folder), "--goal", "x", *TINY]) == 2
    assert "frame5.png" in capsys.readouterr().err


def test_core_errors_are_one_line(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [str(image_folder), "--goal", "x", *TINY, "--pretrained", str(tmp_path / "no.pt")]

    assert score(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmrm-fast: error: ") and "Traceback" not in err


@pytest.mark.parametrize(
    "extra", [["--alpha", "1.5"], ["--batch-size", "0"], ["--plot=out.jpg"]], ids=["alpha", "batch", "plot"]
)
def test_bad_options_exit_2(image_folder: Path, capsys: pytest.CaptureFixture, extra: list[str]) -> None:
    assert score([str(image_folder), "--goal", "x", *TINY, *extra]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_cli_runs_without_docstrings() -> None:
    """``python -OO`` (PYTHONOPTIMIZE=2, set on some clusters) strips docstrings; help text is built from them."""
    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for args in (["--help"], ["export", "--help"], ["bench", "--help"]):
        result = subprocess.run([sys.executable, "-OO", "-m", "vlmrm_fast", *args], capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0 and "usage: vlmrm-fast" in result.stdout, (args, result.stderr[-2000:])


def test_help_lists_score(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    assert "score" in capsys.readouterr().out
    assert cli.main(["score", "--help"]) == 0
    assert "--baseline" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["frame10.png", "Frame2.png", "frame1.png", "frame_b.png", "frame_a10.png", "frame_a9.png"]
    ordered = [p.name for p in sorted(map(Path, names), key=frame_files.natural_key)]
    assert ordered == ["frame1.png", "Frame2.png", "frame10.png", "frame_a9.png", "frame_a10.png", "frame_b.png"]
    # Names equal by number value and case still have one order, whatever order the folder lists them in.
    ties = ["frame1.png", "frame01.png", "Frame1.png"]
    orders = {tuple(p.name for p in sorted(map(Path, given), key=frame_files.natural_key)) for given in (ties, ties[::-1])}
    assert orders == {("Frame1.png", "frame01.png", "frame1.png")}


def test_batched_splits_on_size_change() -> None:
    shapes = [(2, 3), (2, 3), (2, 3), (4, 4), (2, 3)]
    frames = [(np.zeros((*s, 3), np.uint8), str(i)) for i, s in enumerate(shapes)]

    batches = list(score_command.batched(frames, batch_size=2))

    assert [names for _, names in batches] == [["0", "1"], ["2"], ["3"], ["4"]]
    assert [b.shape for b, _ in batches] == [(2, 2, 3, 3), (1, 2, 3, 3), (1, 4, 4, 3), (1, 2, 3, 3)]


def test_images_are_read_upright_by_their_exif_orientation(tmp_path: Path) -> None:
    # Stored 40 wide and 20 high, left half red; Orientation 6: shown turned 90 degrees clockwise, so
    # 20 wide and 40 high with the red half on top, as a video's rotation is applied by its reader.
    from vlmrm_fast.frame_files import read_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    frame = read_image(tmp_path / "turned.png")
    assert frame.shape == (40, 20, 3)
    np.testing.assert_array_equal(frame, np.rot90(stored, k=-1))
    assert frame[:20, :, 0].min() == 255 and frame[20:, :, 0].max() == 0


def _exif(*entries: tuple[int, int, int, bytes]) -> bytes:
    """An EXIF block: a big-endian TIFF header and one IFD of (tag, type, count, 4-byte value) entries."""
    import struct

    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", *e[:3]) + e[3] for e in entries) + bytes(4)
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd


def test_an_image_whose_exif_is_damaged_is_read_as_a_viewer_shows_it(tmp_path: Path) -> None:
    # PIL's exif_transpose turns the image, then writes its EXIF again without the orientation, which raised
    # struct.error ("required argument is not an integer") on a tag of the wrong type: score stopped with a
    # traceback. An EXIF that cannot be parsed at all (SyntaxError: "not a TIFF file") did the same.
    from vlmrm_fast.frame_files import read_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20, 0] = 255
    turned = _exif((0x0112, 3, 1, b"\0\x06\0\0"), (0x0128, 2, 4, b"ab\0\0"))  # Orientation 6; ResolutionUnit as text
    Image.fromarray(stored).save(tmp_path / "turned.webp", lossless=True, exif=turned)
    np.testing.assert_array_equal(read_image(tmp_path / "turned.webp"), np.rot90(stored, k=-1))
    Image.fromarray(stored).save(tmp_path / "broken.webp", lossless=True, exif=b"Exif\0\0XX\0*" + bytes(8))
    np.testing.assert_array_equal(read_image(tmp_path / "broken.webp"), stored)  # as stored: viewers show it so


def test_sixteen_bit_greyscale_keeps_its_range(tmp_path: Path) -> None:
    # PIL's convert("RGB") clips 16-bit values at 255: nearly every pixel white. The high byte is kept.
    from vlmrm_fast.cli import CLIError
    from vlmrm_fast.frame_files import read_image

    values = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    frame = read_image(tmp_path / "deep.png")
    assert frame.shape == (16, 16, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame[..., 0], (values >> 8).astype(np.uint8))
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(CLIError, match="floating point greyscale.*8-bit RGB"):
        read_image(tmp_path / "float.tiff")


def test_every_command_takes_both_dtype_spellings():
    # bf16 and bfloat16 (fp32/float32, fp16/float16) name one precision in every command, each
    # command keeping its own spelling internally; anything else is refused by the parser.
    from vlmrm_fast.argtypes import dtype_choice
    from vlmrm_fast.train.command import config_from_args

    parser = cli.build_parser()
    for given, want in (("bf16", "bfloat16"), ("BFloat16", "bfloat16"), ("fp32", "float32"), ("auto", "auto")):
        assert parser.parse_args(["score", "x.png", "--goal", "a", "--dtype", given]).dtype == want
    for given, want in (("float16", "fp16"), ("fp16", "fp16"), ("bfloat16", "bf16")):
        assert parser.parse_args(["export", "vlmrm-tiny", "--dtype", given]).dtype == want
    for given, want in (("bf16", "bfloat16"), ("float16", "float16")):
        config, _ = config_from_args(parser.parse_args(["train", "--preset", "smoke", "--reward-dtype", given]))
        assert config.validate().reward_dtype == want
        config, _ = config_from_args(parser.parse_args(["train", "--preset", "smoke", "--set", f"reward_dtype={given}"]))
        assert config.reward_dtype == want
    with pytest.raises(argparse.ArgumentTypeError, match="expected one of fp32, fp16, bf16, got 'int8'"):
        dtype_choice(("fp32", "fp16", "bf16"))("int8")
    with pytest.raises(ValueError, match="reward_dtype must be one of"):
        config_from_args(parser.parse_args(["train", "--preset", "smoke", "--reward-dtype", "half"]))[0].validate()


def test_a_triton_that_cannot_load_leaves_the_package_usable(tmp_path):
    # Loading Triton early is optional: a broken install (a missing libtriton.so, say) must leave the
    # torch paths, as it did before the early load.
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("libtriton.so: cannot open shared object file")\n')
    code = ("import vlmrm_fast\nfrom vlmrm_fast.ops._triton import HAS_TRITON\nassert not HAS_TRITON\n"
            "print(float(vlmrm_fast.CLIPReward.from_pretrained('vlmrm-tiny', None, goal='a', device='cpu', "
            "backend='torch')(__import__('numpy').zeros((1, 8, 8, 3), 'uint8'))[0]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- behaviours a mutation audit found untested ---------------------------------------------------


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    """5 PNG frames of one size."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"f{i}.png")
    return folder


@pytest.mark.parametrize("alpha", ["0", "1", "0.0", "1.0"])
def test_alpha_takes_both_ends_of_the_interval(alpha: str) -> None:
    args = cli.build_parser().parse_args(["score", "x.png", "--goal", "a", "--alpha", alpha])
    assert args.alpha == float(alpha)


def test_batch_size_bounds_the_batches(frames: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    real_call = CLIPReward.__call__

    def call(self, batch, *args, **kwargs):
        sizes.append(len(batch))
        return real_call(self, batch, *args, **kwargs)

    monkeypatch.setattr(CLIPReward, "__call__", call)
    assert score([str(frames), "--goal", "x", "--batch-size", "2", "--backend", "torch", *TINY]) == 0
    assert sizes == [2, 2, 1]


def test_pretrained_none_in_any_case_means_random_weights(frames: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    argv = [str(frames), "--goal", "x", "--out", str(out), *TINY]
    assert score([*argv, "--pretrained", "None"]) == 0 and len(_read_csv(out)) == 5
    assert score([*argv, "--pretrained", "NONE"]) == 0


def test_scoring_the_current_folder_writes_beside_it(frames: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(frames)
    assert score_command.default_csv_path(Path(".")).resolve() == frames.parent / "frames.rewards.csv"
    sub = frames / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert score_command.default_csv_path(Path("..")).resolve() == frames.parent / "frames.rewards.csv"


def test_plot_names_in_capitals_are_pngs_too() -> None:
    assert score_command._plot_path("plots/R.PNG", Path("x.rewards.csv")) == Path("plots/R.PNG")
    with pytest.raises(cli.CLIError, match="expects a .png"):
        score_command._plot_path("r.jpg", Path("x.rewards.csv"))


def test_csv_rewards_read_back_as_the_same_float32(tmp_path: Path) -> None:
    rewards = np.random.default_rng(0).normal(size=50).astype(np.float32) / 7
    score_command.write_csv(tmp_path / "r.csv", rewards, [str(i) for i in range(50)])
    read = np.array([float(r["reward"]) for r in _read_csv(tmp_path / "r.csv")], dtype=np.float32)
    np.testing.assert_array_equal(read, rewards)


def test_a_csv_that_fails_mid_write_leaves_the_earlier_one_in_place(tmp_path: Path) -> None:
    score_command.write_csv(tmp_path / "r.csv", np.array([0.5, 0.25], np.float32), ["a.png", "b.png"])
    before = (tmp_path / "r.csv").read_bytes()
    with pytest.raises(ValueError):  # the second row's reward cannot be written
        score_command.write_csv(tmp_path / "r.csv", np.array([1.0, "not a number"], dtype=object), ["a.png", "b.png"])
    assert (tmp_path / "r.csv").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # and no temporary file left beside it


def test_summary_reports_min_and_max() -> None:
    line = score_command._summary(np.array([1.0, -2.0, 3.0], np.float32), 0.5, [Path("r.csv")])
    assert "scored 3 frames in 0.50 s (6.0 frames/s)" in line
    assert "mean 0.6667, min -2.0000, max 3.0000; wrote r.csv" in line
    assert score_command._summary(np.array([0.5], np.float32), 0.5, [Path("r.csv")]).startswith("scored 1 frame in ")


def test_summary_gives_the_rate_after_a_first_batch_that_warmed_up(monkeypatch) -> None:
    # score --backend compile compiles in its first call: 17 s for 12 frames read as 0.7 frames/s.
    rewards = np.zeros(12, np.float32)
    line = score_command._summary(rewards, 10.0, [Path("r.csv")], first_call=(4, 9.0))
    assert "(1.2 frames/s; the first batch took 9.00 s (compiling, building kernels, warming up), then 8.0 " in line
    for plain in ((4, 10.0 * 4 / 12), (12, 9.0), None):  # no slower than the rest; one batch; not timed
        assert "first batch" not in score_command._summary(rewards, 10.0, [Path("r.csv")], first_call=plain)
    calls = []
    timer = score_command._FirstCallTimer(lambda frames: calls.append(len(frames)) or torch.zeros(len(frames)))
    clock = iter([1.0, 3.5])
    monkeypatch.setattr(score_command.time, "perf_counter", lambda: next(clock))
    timer(np.zeros((5, 2, 2, 3), np.uint8))
    timer(np.zeros((3, 2, 2, 3), np.uint8))
    assert calls == [5, 3] and timer.timing(full_batch=5) == (5, 2.5)  # the first call's frames and seconds only
    assert timer.timing(full_batch=8) is None  # a first batch cut short (the next frame had another size)


@pytest.mark.parametrize("flags,noted", [
    (["--baseline", "a shape"], True),                      # the baseline given, alpha left at 0: unused
    (["--baseline", "a shape", "--alpha", "0.5"], False),
    ([], False),
], ids=["baseline-alpha0", "baseline-alpha", "no-baseline"])
def test_a_baseline_that_alpha_0_leaves_unused_is_noted(image_folder: Path, tmp_path: Path, capsys, flags,
                                                         noted) -> None:
    assert score([str(image_folder), "--goal", "a red square", *flags, "--out", str(tmp_path / "r.csv"), *TINY]) == 0
    assert ("--baseline is unused at --alpha 0" in capsys.readouterr().err) is noted


def test_image_suffixes_in_capitals_are_images(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "SHOT.PNG", format="PNG")
    source = frame_files.open_frames(tmp_path / "SHOT.PNG")
    assert isinstance(source, frame_files.ImageFiles) and source.total == 1


def test_a_folder_named_like_an_image_is_not_a_frame(frames: Path) -> None:
    (frames / "more.png").mkdir()
    assert [p.name for p in frame_files.list_images(frames)] == [f"f{i}.png" for i in range(5)]


def test_frames_past_the_listed_timestamps_are_labelled_by_fps(tmp_path: Path) -> None:
    source = frame_files.VideoFile(tmp_path / "v.mp4", fps=10.0, size=(4, 4), total=2, timestamps=[0.0, 0.5])
    assert [source._label(i) for i in range(4)] == ["0.0000", "0.5000", "0.2000", "0.3000"]


@pytest.mark.parametrize("listing,times", [
    ("#tb 0: 1/10\n0, 0, 0, 1, 9, 0x0\n0, 1, 3, 1, 9, 0x0\n0, 2, 1, 1, 9, 0x0\n0, 3, 2, 1, 9, 0x0\n",
     [0.0, 0.1, 0.2, 0.3]),  # B-frames: packets in decoding order
    ("#tb 0: 1/10\n0, 0, 1, 1, 9, 0x0\n0, 1, 0, 1, 9, 0x0\n0, 2, 2, 1, 9, 0x0\n", [0.0, 0.1, 0.2]),
    (f"#tb 0: 1/10\n0, 0, 0, 1, 9, 0x0\n0, 1, {frame_files.NO_PTS}, 1, 9, 0x0\n", None),  # a packet without a time
    # a stream-copied trim: packets before the edit list's start are flagged discard (0x4), never decoded
    ("#tb 0: 1/10\n0, -4, -4, 1, 9, 0x0, F=0x5\n0, -3, -2, 1, 9, 0x0, F=0x4\n0, -2, 0, 1, 9, 0x0, F=0x1\n"
     "0, -1, 1, 1, 9, 0x0\n", [0.0, 0.1]),
], ids=["reordered", "first-not-earliest", "no-pts", "discarded"])
def test_frame_timestamps_are_presentation_times_from_the_earliest(monkeypatch, listing, times) -> None:
    import subprocess
    import types

    monkeypatch.setattr(frame_files.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing))
    fake = types.SimpleNamespace(get_ffmpeg_exe=lambda: "ffmpeg")
    got = frame_files._list_packets(fake, Path("v.mp4"))[0]
    assert got == (None if times is None else pytest.approx(times))


def test_backend_errors_name_the_commands_flags(frames: Path, capsys: pytest.CaptureFixture) -> None:
    # The backends' errors are written for Python callers (dtype=torch.float32, backend='torch'); score
    # names its own flags instead, as bench does.
    pytest.importorskip("onnxruntime")  # without it, the first error is the missing package
    base = [str(frames), "--goal", "a", "--model", "vlmrm-tiny", "--pretrained", "none", "--device", "cpu"]
    assert score([*base, "--backend", "onnxruntime", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "pass --dtype fp32" in err and "dtype=torch" not in err, err
    assert score([*base, "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "use --backend onnxruntime" in err and "backend='onnxruntime'" not in err, err


def test_a_stream_copied_trim_is_labelled_by_the_frames_it_decodes_to(tmp_path: Path, capsys) -> None:
    # ffmpeg -ss ... -c copy keeps the packets before the cut, flagged discard, for the decoder to start
    # from: they are not frames. 27 frames at 10 fps with B-frames, cut at 0.35 s, decode to 23.
    ffmpeg = pytest.importorskip("imageio_ffmpeg")
    import subprocess

    exe, long, trimmed = ffmpeg.get_ffmpeg_exe(), tmp_path / "long.mp4", tmp_path / "trimmed.mp4"
    for command in ([exe, "-y", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-frames:v", "27",
                     "-g", "30", "-bf", "2", "-pix_fmt", "yuv420p", str(long)],
                    [exe, "-y", "-v", "error", "-ss", "0.35", "-i", str(long), "-c", "copy", str(trimmed)]):
        if subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip("this ffmpeg cannot make the clip (no H.264 encoder)")
    times = frame_files._list_packets(ffmpeg, trimmed)[0]
    assert times == pytest.approx([i / 10 for i in range(23)])
    out = tmp_path / "r.csv"
    assert score([str(trimmed), "--goal", "a", "--model", "vlmrm-tiny", "--pretrained", "none", "--backend", "torch",
                  "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert len(_read_csv(out)) == 23 and "container lists" not in capsys.readouterr().err


def test_an_interrupted_score_exits_130(frames: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_command, "score_frames", interrupted)
    assert score([str(frames), "--goal", "x", *TINY]) == 130
    assert capsys.readouterr().err.strip().endswith("vlmrm-fast: error: interrupted")


@pytest.mark.parametrize("name", ["moving.webp", "moving.png"])
def test_an_animated_image_is_refused_not_scored_by_its_first_frame(tmp_path: Path, name: str) -> None:
    # An animated WebP or PNG (APNG) read as one image gave one row, its first frame's, and the rest went unscored.
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (0, 128, 255)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    with pytest.raises(cli.CLIError, match=r"animated \(3 frames\).*folder of images"):
        frame_files.read_image(tmp_path / name)
    with pytest.raises(cli.CLIError, match=r"animated \(3 frames\)"):  # as score's PATH: before the model loads
        frame_files.open_frames(tmp_path / name)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "still.webp")  # one frame: an image as before
    assert frame_files.read_image(tmp_path / "still.webp").shape == (8, 8, 3)


def test_thirty_two_bit_integer_images_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "deep.tiff")
    assert Image.open(tmp_path / "deep.tiff").mode == "I"
    with pytest.raises(cli.CLIError, match="32-bit integer greyscale"):
        frame_files.read_image(tmp_path / "deep.tiff")


def test_an_image_past_pillows_size_limit_is_named_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    # Pillow refuses an image of more than twice MAX_IMAGE_PIXELS (a 180-megapixel scan, or a damaged header
    # claiming one) with DecompressionBombError, which is not an OSError: score stopped with a traceback.
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: past twice the limit
    with pytest.raises(cli.CLIError, match=r"cannot read image '.*huge\.png' \(Image size \(256 pixels\).*scale it down"):
        frame_files.read_image(tmp_path / "huge.png")
    assert score([str(tmp_path / "huge.png"), "--goal", "x", *TINY]) == 2  # a usage error, as for a damaged image


def test_a_file_name_that_is_not_utf8_is_written_with_escapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A name with a Latin-1 byte reached the CSV as a lone surrogate: every frame was scored, then writing failed
    # ("'utf-8' codec can't encode character '\\udcff' ...: surrogates not allowed") and nothing was written.
    folder = tmp_path / "frames"
    folder.mkdir()
    try:
        Image.fromarray(_picture("frame1")).save(folder / os.fsdecode(b"frame\xe91.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    Image.fromarray(_picture("frame2")).save(folder / "frame2.png")
    out = tmp_path / "rewards.csv"
    assert score([str(folder), "--goal", "x", *TINY, "--out", str(out)]) == 0
    assert [row["source"] for row in _read_csv(out)] == ["frame2.png", "frame\\xe91.png"]  # the file is UTF-8
    assert score([str(folder), "--goal", "x", *TINY, "--out", "-"]) == 0
    assert "frame\\xe91.png" in capsys.readouterr().out


def test_a_video_of_no_decodable_frames_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("imageio_ffmpeg", reason="needs imageio-ffmpeg: pip install 'vlmrm-fast[cli]'")
    def metadata_only(ffmpeg, path):  # a generator, as imageio-ffmpeg's reader: the metadata, then no frame
        yield {"size": (4, 4), "fps": 10.0}

    monkeypatch.setattr(frame_files, "_read_frames", metadata_only)
    source = frame_files.VideoFile(tmp_path / "v.mp4", fps=10.0, size=(4, 4), total=None)
    with pytest.raises(cli.CLIError, match="no frames could be decoded"):
        list(source)


@pytest.mark.parametrize("alpha,shown", [(0.5, True), (0.0, False)])
def test_the_plot_title_names_the_baseline_only_where_it_counts(tmp_path: Path, monkeypatch, alpha, shown) -> None:
    axes = pytest.importorskip("matplotlib.axes")
    titles = []
    monkeypatch.setattr(axes.Axes, "set_title", lambda self, title, **kwargs: titles.append(title))
    score_command.write_plot(tmp_path / "r.png", np.zeros(3, np.float32), ["a cat"], ["an animal"], alpha)
    assert titles[0].startswith('goal: "a cat"')
    assert ("baseline:" in titles[0]) is shown
    if shown:
        assert 'baseline: "an animal", alpha = 0.5' in titles[0]
    score_command.write_plot(tmp_path / "r.png", np.zeros(3, np.float32), ["a cat"], None, 0.0, "v.mp4 by m, w")
    assert titles[1] == 'goal: "a cat"\nv.mp4 by m, w'  # which frames, which model: plots get compared
    long = "clip.mp4 by ViT-B-32, " + "x" * 120 + ".pt"
    score_command.write_plot(tmp_path / "r.png", np.zeros(3, np.float32), ["a cat"], None, 0.0, long)
    assert titles[2] == 'goal: "a cat"\n' + long[:97] + "..."  # cut, not dropped whole as one long word


def test_score_plot_names_the_input_and_the_model(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    titles = []
    real = score_command.write_plot
    monkeypatch.setattr(score_command, "write_plot", lambda *a, **kw: titles.append(a[-1]) or real(*a, **kw))
    assert score([str(image_folder), "--goal", "a", f"--plot={tmp_path / 'p.png'}", *TINY]) == 0
    assert titles == [f"{image_folder.name} by vlmrm-tiny, random weights"]


def test_the_plot_of_a_folder_whose_name_is_not_utf8_is_written(tmp_path: Path) -> None:
    # The title named the folder with a lone surrogate, which matplotlib refused ("set_text(): incompatible function
    # arguments") after the CSV was written: exit status 2 and no plot.
    try:
        folder = tmp_path / os.fsdecode(b"fr\xe9mes")
        folder.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    Image.fromarray(_picture("frame1")).save(folder / "frame1.png")
    assert score([str(folder), "--goal", "a", f"--plot={tmp_path / 'p.png'}", *TINY]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


# What main() does around every command: exit codes, one-line errors and warnings, the package's own
# log lines. Each command's real work is replaced by a stand-in handler.

COMMAND_ARGV = {"score": ["score", "x.png", "--goal", "a"], "export": ["export", "vlmrm-tiny"],
                "bench": ["bench"], "train": ["train"]}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _every_handler(monkeypatch: pytest.MonkeyPatch, handler) -> None:
    """Make every command of ``cli.main`` run ``handler(args)`` instead of its work."""
    real_build = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = real_build()
        for sub in _subparsers(parser).values():
            sub.set_defaults(handler=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)


def test_the_stand_in_commands_cover_every_command() -> None:
    assert set(_subparsers(cli.build_parser())) == set(COMMAND_ARGV)


@pytest.mark.parametrize("command", sorted(COMMAND_ARGV))
def test_an_unknown_option_is_refused_with_its_commands_usage(monkeypatch, capsys, command: str) -> None:
    """``vlmrm-fast bench --plot`` printed the top level's usage (``COMMAND ...``), which names none of
    bench's options; the command's own usage shows the one meant (``--no-plot``). An unknown option before
    the command is the top level's, and nothing runs either way."""
    _every_handler(monkeypatch, lambda args: pytest.fail("a command ran despite an unknown option"))
    assert cli.main([*COMMAND_ARGV[command], "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert f"usage: vlmrm-fast {command} " in err, err
    assert err.rstrip().endswith(f"vlmrm-fast {command}: error: unrecognized arguments: --no-such-option"), err
    assert cli.main(["--no-such-option", *COMMAND_ARGV[command]]) == 2
    err = capsys.readouterr().err
    assert "usage: vlmrm-fast [-h] [--version] COMMAND" in err
    assert err.rstrip().endswith("vlmrm-fast: error: unrecognized arguments: --no-such-option"), err


@pytest.mark.parametrize("command,knob", [("score", "--batch-size"), ("bench", "--batch-sizes"),
                                          ("train", "--reward-batch-size"), ("export", None)])
def test_out_of_gpu_memory_names_options_the_command_has(monkeypatch, capsys, command: str, knob) -> None:
    # The fix the message names must be one the user can type after the same command (export takes its
    # model as MODEL, not --model).
    def out_of_memory(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _every_handler(monkeypatch, out_of_memory)
    assert cli.main(COMMAND_ARGV[command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmrm-fast: error: out of GPU memory") and err.count("\n") == 1, err
    options = {s for a in _subparsers(cli.build_parser())[command]._actions for s in a.option_strings}
    named = set(re.findall(r"--[a-z][a-z-]*", err))
    assert (knob is None or knob in named) and named <= options, (named - options, err)


@pytest.mark.parametrize("error", [
    cli.CLIError("bad clip; re-encode it"), ValueError("bad value; pass 3"), TypeError("bad type; pass a str"),
    FileNotFoundError("no such file: x.pt"), "PretrainedWeightsError",
], ids=["cli", "value", "type", "os", "weights"])
def test_expected_errors_are_one_line_and_exit_2(monkeypatch, capsys, error) -> None:
    if error == "PretrainedWeightsError":
        from vlmrm_fast import PretrainedWeightsError

        error = PretrainedWeightsError("offline; pass a local checkpoint")

    def fails(args):
        raise error

    _every_handler(monkeypatch, fails)
    assert cli.main(COMMAND_ARGV["score"]) == 2
    assert capsys.readouterr().err == f"vlmrm-fast: error: {error}\n"


def test_warnings_are_one_line_on_stderr_while_a_command_runs(monkeypatch, capsys) -> None:
    import warnings

    def warns(args):
        warnings.warn("the container lists 7 frames; re-encode it", UserWarning)
        return 0

    _every_handler(monkeypatch, warns)
    before = warnings.showwarning
    assert cli.main(COMMAND_ARGV["score"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "vlmrm-fast: warning: the container lists 7 frames; re-encode it\n" and captured.out == ""
    assert warnings.showwarning is before  # the hook is the caller's again afterwards


@pytest.mark.parametrize("command,shown", [("score", True), ("train", True), ("bench", False), ("export", False)])
def test_the_packages_log_lines_are_shown_for_score_and_train_once_each(monkeypatch, capsys, command, shown) -> None:
    # score and train announce one-off builds (an ONNX export) on stderr; bench reports build times in
    # its table. One line each, however the root logger is set up, and the logger is left as found.
    import io
    import logging

    def announces(args):
        logging.getLogger("vlmrm_fast.backends.onnxruntime").info("exporting the vision tower to ONNX")
        return 0

    _every_handler(monkeypatch, announces)
    logger, root = logging.getLogger("vlmrm_fast"), logging.getLogger()
    elsewhere = io.StringIO()
    root_handler = logging.StreamHandler(elsewhere)
    monkeypatch.setattr(root, "handlers", [root_handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    monkeypatch.setattr(logger, "propagate", True)
    level = logger.level
    logger.setLevel(logging.ERROR)  # a level of the caller's own, to be found again afterwards
    try:
        before = (logger.level, list(logger.handlers), logger.propagate)
        assert cli.main(COMMAND_ARGV[command]) == 0
        after = (logger.level, list(logger.handlers), logger.propagate)
    finally:
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert err == ("vlmrm-fast: exporting the vision tower to ONNX\n" if shown else "")
    if shown:
        assert elsewhere.getvalue() == ""  # not a second copy through the root logger
    assert after == before


def test_bad_alpha_is_refused_with_the_interval(capsys) -> None:
    # (1.5 too: past 1, refused by the parser, before any model loads.)
    for given, shown in (("nan", "got nan"), ("-0.1", "got -0.1"), ("1.5", "got 1.5"), ("half", "got 'half'")):
        assert cli.main([*COMMAND_ARGV["score"], "--alpha", given]) == 2
        assert f"--alpha: expected a number in [0, 1], {shown}" in capsys.readouterr().err


def test_positive_int_refuses_zero_fractions_and_words_saying_what_it_expects(capsys) -> None:
    from vlmrm_fast.argtypes import positive_int

    assert positive_int("3") == 3
    for given, shown in (("0", "0"), ("-3", "-3"), ("2.5", "'2.5'"), ("two", "'two'")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a positive integer, got {shown}$"):
            positive_int(given)
    assert cli.main([*COMMAND_ARGV["score"], "--batch-size", "two"]) == 2
    assert "--batch-size: expected a positive integer, got 'two'" in capsys.readouterr().err


def test_dtype_names_ignore_surrounding_spaces_and_case() -> None:
    from vlmrm_fast.argtypes import dtype_name

    assert dtype_name(" BF16 ", long=True) == "bfloat16" and dtype_name("Float16\n", long=False) == "fp16"
    assert dtype_name(" Int8", long=True) == "int8"  # unknown: lower-cased for the caller's own check


def test_a_missing_optional_dependency_names_the_install_command(monkeypatch) -> None:
    import importlib

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(cli.CLIError, match=r"'pillow' is needed .*pip install 'vlmrm-fast\[cli\]'"):
        require_cli_extra("PIL.Image", "pillow")


def _cut_short_savefig(figure, target, **kwargs):
    """Figure.savefig that writes the start of a PNG to its target, then fails (a full disk, a kill)."""
    if isinstance(target, (str, os.PathLike)):
        Path(target).write_bytes(b"\x89PNG cut short")
    else:
        target.write(b"\x89PNG cut short")
    raise OSError("No space left on device")


def test_a_plot_cut_short_keeps_the_earlier_plot_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    figure_module = pytest.importorskip("matplotlib.figure")
    plot = tmp_path / "r.png"
    plot.write_bytes(b"an earlier run's plot")
    monkeypatch.setattr(figure_module.Figure, "savefig", _cut_short_savefig)
    with pytest.raises(OSError, match="No space left"):
        score_command.write_plot(plot, np.array([0.1, 0.2]), ["a goal"], None, 0.0)
    assert plot.read_bytes() == b"an earlier run's plot" and os.listdir(tmp_path) == ["r.png"]


def test_outputs_that_are_inputs_or_folders_are_settled_before_scoring(
    image_folder: Path, video: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--out/--plot naming an input would replace it; a folder took the whole run before failing."""
    image = image_folder / "frame2.png"
    before = image.read_bytes(), video.read_bytes()
    assert score([str(image), "--goal", "x", f"--plot={image}", *TINY]) == 2
    assert score([str(image_folder), "--goal", "x", f"--plot={image}", *TINY]) == 2
    assert score([str(video), "--goal", "x", "--out", str(video), *TINY]) == 2
    assert (image.read_bytes(), video.read_bytes()) == before
    assert "is an input of this run" in capsys.readouterr().err
    folder = tmp_path / "results"
    folder.mkdir()
    assert score([str(video), "--goal", "x", "--out", str(folder), *TINY]) == 0
    assert len(_read_csv(folder / video.with_suffix(".rewards.csv").name)) > 0
    # A folder not there yet, named with a trailing separator, is made (argparse's Path dropped the
    # separator, and the CSV became a file named "new").
    assert score([str(video), "--goal", "x", "--out", str(tmp_path / "new") + os.sep, *TINY]) == 0
    assert len(_read_csv(tmp_path / "new" / video.with_suffix(".rewards.csv").name)) > 0


def test_an_out_that_is_a_symbolic_link_is_written_through(image_folder: Path, video: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    # --out latest.csv -> runs/r7.csv: the rewards land in runs/r7.csv and the link stays (it was replaced by a
    # file, the target left as it was). A link that leads to an input is still an input of the run.
    target = tmp_path / "runs" / "r7.csv"
    target.parent.mkdir()
    target.write_text("an earlier run\n")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    assert score([str(image_folder), "--goal", "x", "--out", str(link), *TINY]) == 0
    assert link.is_symlink() and len(_read_csv(target)) == len(FRAME_NAMES)
    to_input = tmp_path / "to-input.csv"
    to_input.symlink_to(video)
    before = video.read_bytes()
    assert score([str(video), "--goal", "x", "--out", str(to_input), *TINY]) == 2
    assert "is an input of this run" in capsys.readouterr().err and video.read_bytes() == before

def test_out_and_plot_naming_one_file_are_refused_before_scoring(image_folder: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    # The plot, written second, replaced the CSV: "wrote r.png, r.png", exit 0, no rewards anywhere.
    from vlmrm_fast.reward import CLIPReward

    monkeypatch.setattr(CLIPReward, "from_pretrained", lambda *a, **k: pytest.fail("model loaded first"))
    out = tmp_path / "r.png"
    assert score([str(image_folder), "--goal", "x", "--out", str(out), f"--plot={out}", *TINY]) == 2
    assert "names an image (.png), but --out is the rewards CSV" in capsys.readouterr().err and not out.exists()
    link = tmp_path / "r.csv"  # a CSV name that leads to the plot's file
    link.symlink_to(out)
    assert score([str(image_folder), "--goal", "x", "--out", str(link), f"--plot={out}", *TINY]) == 2
    assert "--out and --plot both name" in capsys.readouterr().err and not out.exists()
    (tmp_path / "sub").mkdir()
    assert score([str(image_folder), "--goal", "x", "--out", str(link), f"--plot={tmp_path / 'sub' / '..' / 'r.png'}",
                  *TINY]) == 2  # the same file, spelt another way
    assert "--out and --plot both name" in capsys.readouterr().err and not out.exists()


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(image_folder: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    from vlmrm_fast.reward import CLIPReward

    monkeypatch.setattr(CLIPReward, "from_pretrained", lambda *a, **k: pytest.fail("model loaded first"))
    (tmp_path / "a-file").write_text("")
    assert score([str(image_folder), "--goal", "x", "--out", str(tmp_path / "a-file" / "r.csv"), *TINY]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # Through a symbolic link, the folder checked is the one the link leads into (where the CSV is written).
    (tmp_path / "latest.csv").symlink_to(tmp_path / "a-file" / "r.csv")
    assert score([str(image_folder), "--goal", "x", "--out", str(tmp_path / "latest.csv"), *TINY]) == 2
    assert f"'{tmp_path / 'a-file'}' is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--pretrained", "laion9b"], r"or --pretrained none for random weights"),  # the Python form said pretrained=None
    (["--pretrained", "none", "--alpha", "0.5"], r"cannot use --alpha 0.5: it has no baseline.*Pass --alpha 0, or give a "
                                                 r"--baseline"),
], ids=["tag", "alpha"])
def test_score_errors_name_its_own_flags(image_folder: Path, tmp_path: Path, capsys, flags, message) -> None:
    argv = [str(image_folder), "--goal", "a red square", "--model", "vlmrm-tiny", *flags, "--out", str(tmp_path / "r.csv")]
    assert score(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "pretrained=None" not in err and "alpha=" not in err


# ---- vlmrm_fast.argtypes: what a mutation audit found unguarded ----------------------------------------


def test_the_smallest_allowed_integers_are_taken() -> None:
    # The bounds themselves: --batch-size 1 and --warmup 0 are allowed.
    from vlmrm_fast.argtypes import non_negative_int, positive_int

    assert positive_int("1") == 1 and non_negative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 0, got -1$"):
        non_negative_int("-1")


def test_an_out_below_a_file_names_the_file_in_the_way(tmp_path: Path) -> None:
    # --out a-file/sub/: the folder cannot be made because a folder on its way is a file; the message names
    # that file, not the OS's "Not a directory" alone.
    from vlmrm_fast.argtypes import writable_folder

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"cannot write in '{tmp_path / 'a-file' / 'sub'}' "
                                                   f"('{tmp_path / 'a-file'}' is a file); pass another --out")):
        writable_folder(tmp_path / "a-file" / "sub", "--out")


def test_a_folder_removed_before_the_probe_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failed training run removes the run folder it made (run_lock.remove_unstarted_run); a newcomer's
    # writable_folder can meet that between its mkdir and its probe file. It makes the folder again instead
    # of calling the folder unwritable.
    import tempfile

    from vlmrm_fast import argtypes

    folder = tmp_path / "runs" / "shared"
    real_mkstemp = tempfile.mkstemp
    calls = []

    def removed_once(*args, **kwargs):
        calls.append(kwargs["dir"])
        if len(calls) == 1:
            folder.rmdir()
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(argtypes.tempfile, "mkstemp", removed_once)
    assert argtypes.writable_folder(folder, "--run-dir") == folder
    assert len(calls) == 2 and folder.is_dir() and list(folder.iterdir()) == []


def test_a_folder_removed_inside_mkdir_is_made_again_and_a_file_put_there_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mkdir(exist_ok=True) raises FileExistsError when the folder it found is gone by the time it checks it is
    # a folder: look again and make it. Something put there meanwhile that is no folder is named as such.
    import pathlib

    from vlmrm_fast import argtypes

    folder = tmp_path / "shared"
    real_mkdir = pathlib.Path.mkdir
    calls = []

    def vanished_once(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 1:
            raise FileExistsError(17, "File exists")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", vanished_once)
    assert argtypes.writable_folder(folder, "--run-dir") == folder
    assert len(calls) == 2 and folder.is_dir()

    other = tmp_path / "other"

    def a_file_appears(self, *args, **kwargs):
        self.write_text("")
        raise FileExistsError(17, "File exists")

    monkeypatch.setattr(pathlib.Path, "mkdir", a_file_appears)
    with pytest.raises(ValueError, match=re.escape(f"'{other}' is a file, not a folder; pass another --out")):
        argtypes.writable_folder(other, "--out")


def test_a_folder_removed_again_and_again_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bounded: a folder that vanishes before every probe ends in the usual error, not an endless loop.
    import tempfile

    from vlmrm_fast import argtypes
    from vlmrm_fast.atomic import MAKE_ATTEMPTS

    folder = tmp_path / "shared"
    real_mkstemp = tempfile.mkstemp
    calls = []

    def always_removed(*args, **kwargs):
        calls.append(1)
        folder.rmdir()
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(argtypes.tempfile, "mkstemp", always_removed)
    with pytest.raises(ValueError, match=re.escape(f"cannot write in '{folder}' (No such file or directory); "
                                                   "pass another --run-dir")):
        argtypes.writable_folder(folder, "--run-dir")
    assert len(calls) == MAKE_ATTEMPTS


def test_a_folder_removed_between_two_looks_is_not_called_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One stat decides "is a file": with exists() then is_dir(), a folder removed between the two (another
    # process's clean-up) passed for a file, and the command refused a folder it could have made again.
    # os.stat, not Path.stat: every look goes through it, whatever Python's pathlib calls (Path.exists stopped
    # calling Path.stat in 3.13), so the test sees two looks however they are spelt.
    from vlmrm_fast import argtypes

    folder = tmp_path / "shared"
    folder.mkdir()
    real_stat = os.stat
    removed = []

    def removed_after_the_first_look(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == os.fspath(folder) and not removed:
            removed.append(1)
            folder.rmdir()
        return result

    monkeypatch.setattr(os, "stat", removed_after_the_first_look)
    import pathlib

    if hasattr(pathlib, "_NormalAccessor"):  # Python 3.10: Path.stat calls the os.stat its accessor bound at import
        monkeypatch.setattr(pathlib._NormalAccessor, "stat", staticmethod(removed_after_the_first_look))
    assert argtypes.writable_folder(folder, "--run-dir") == folder
    assert removed and folder.is_dir() and list(folder.iterdir()) == []


def test_a_folder_below_one_we_may_not_enter_is_named_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --out locked/new/sub, where locked/ may not be entered: looking for a file on the way must not let the
    # OS's PermissionError escape as a traceback; the error names the folder and the OS's reason.
    import pathlib

    from vlmrm_fast import argtypes

    locked = tmp_path / "locked"
    folder = locked / "new" / "sub"

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    real_stat = pathlib.Path.stat

    def stat_denied_below_locked(self, *args, **kwargs):
        if locked in self.parents:
            denied(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    monkeypatch.setattr(pathlib.Path, "stat", stat_denied_below_locked)
    with pytest.raises(ValueError, match=re.escape(f"cannot write in '{folder}' (Permission denied); pass another --out")):
        argtypes.writable_folder(folder, "--out")


@pytest.mark.parametrize("below", [False, True], ids=["the-folder", "a-parent"])
def test_a_link_to_a_missing_disk_is_named(tmp_path: Path, below: bool) -> None:
    # runs -> /scratch/me/runs on a node where /scratch is not mounted: mkdir says only "File exists" (after
    # in_made_folder's retries); the error names the link, its target and the fix.
    from vlmrm_fast.argtypes import writable_folder

    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "scratch" / "runs")
    folder = link / "exp1" if below else link
    with pytest.raises(ValueError, match=re.escape(
            f"cannot write in '{folder}' ('{link}' is a symbolic link to '{tmp_path / 'scratch' / 'runs'}', which "
            f"does not exist); make it (is its disk mounted?), or pass another --out")):
        writable_folder(folder, "--out")
    assert not (tmp_path / "scratch").exists()  # the target is the user's to make: never made behind their back


def test_a_loop_of_links_is_named(tmp_path: Path) -> None:
    from vlmrm_fast.argtypes import writable_folder

    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for folder in (tmp_path / "a", tmp_path / "a" / "sub"):
        with pytest.raises(ValueError, match=re.escape(f"cannot write in '{folder}' ('{tmp_path / 'a'}' is a symbolic "
                                                       "link to 'b', a loop of links); point it at a folder, or pass "
                                                       "another --out")):
            writable_folder(folder, "--out")


def test_a_link_that_leads_to_a_folder_is_written_through(tmp_path: Path) -> None:
    # Only a link that leads nowhere is an error: one to a folder (the usual runs -> /scratch/runs) is used.
    from vlmrm_fast.argtypes import writable_folder

    (tmp_path / "scratch").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "scratch")
    assert writable_folder(tmp_path / "runs" / "exp1", "--out") == tmp_path / "runs" / "exp1"
    assert (tmp_path / "scratch" / "exp1").is_dir()


def test_a_chain_of_links_to_a_missing_disk_names_where_it_ends(tmp_path: Path) -> None:
    # runs -> scratch/runs, scratch -> /mnt/gone: "make 'scratch/runs'" cannot be done (scratch leads nowhere);
    # the end of the chain is what to make. A relative target is named where it leads too.
    from vlmrm_fast.argtypes import writable_folder

    (tmp_path / "runs").symlink_to("scratch/runs")
    (tmp_path / "scratch").symlink_to(tmp_path / "mnt" / "gone")
    with pytest.raises(ValueError, match=re.escape(
            f"('{tmp_path / 'runs'}' is a symbolic link to 'scratch/runs' (leading to "
            f"'{tmp_path / 'mnt' / 'gone' / 'runs'}'), which does not exist)")):
        writable_folder(tmp_path / "runs" / "exp1", "--out")


def test_an_out_linked_into_a_missing_folder_is_refused_and_nothing_made(image_folder: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    # latest.csv -> /scratch/runs/r7.csv, /scratch not mounted: a plain open fails; the check made
    # /scratch/runs (on the wrong disk) and the rewards went there.
    link = tmp_path / "latest.csv"
    link.symlink_to(tmp_path / "scratch" / "runs" / "r7.csv")
    assert score([str(image_folder), "--goal", "x", "--out", str(link), *TINY]) == 2
    assert (f"'{link}' is a symbolic link to '{tmp_path / 'scratch' / 'runs' / 'r7.csv'}', whose folder does not "
            "exist; make it (is its disk mounted?)" in capsys.readouterr().err)
    assert not (tmp_path / "scratch").exists() and link.is_symlink()


def test_an_out_that_is_a_loop_of_links_is_named_and_kept(image_folder: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    # Path.resolve raised RuntimeError (a traceback) before 3.13; from 3.13 the rename replaced the link with a file.
    (tmp_path / "a.csv").symlink_to("b.csv")
    (tmp_path / "b.csv").symlink_to("a.csv")
    assert score([str(image_folder), "--goal", "x", "--out", str(tmp_path / "a.csv"), *TINY]) == 2
    assert (f"'{tmp_path / 'a.csv'}' is a symbolic link to 'b.csv', a loop of links; point it at a file"
            in capsys.readouterr().err)
    assert (tmp_path / "a.csv").is_symlink()


@pytest.mark.parametrize("name,kind", [("r.png", "an image"), ("r.JPG", "an image"), ("r.gif", "an image"),
                                       ("r.tiff", "an image"), ("r.mp4", "a video"), ("r.webm", "a video")])
def test_an_out_named_as_an_image_or_video_is_refused(frames: Path, tmp_path: Path, monkeypatch, capsys,
                                                      name: str, kind: str) -> None:
    # `score clip.gif --out r.png` wrote CSV into r.png: a viewer cannot open it, and a later score over the
    # folder would take it for a frame. Refused before the model loads, naming the CSV name (and --plot for a PNG).
    monkeypatch.setattr(score_command, "score_frames", lambda *a, **k: pytest.fail("scored"))
    out = tmp_path / name
    assert score([str(frames), "--goal", "a", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    suffix = Path(name).suffix
    assert (f"--out '{out}' names {kind} ({suffix.lower()}), but --out is the rewards CSV: pass --out "
            f"{out.with_suffix('.csv')}") in err, err
    assert ("--plot=" in err) == (suffix == ".png") and not out.exists()


def test_a_score_stopped_early_leaves_no_decoding_thread_behind() -> None:
    # A scoring call that failed (or was interrupted) while the decoder thread had queued its last batch left
    # that thread waiting for good to put its end marker into the full queue: one thread and two decoded batches
    # per call, in a process that goes on (score run from Python, Ctrl-C in a notebook).
    import threading
    import time

    def decoding() -> set:
        return {t for t in threading.enumerate() if t.name == "vlmrm-fast-decode"}

    before = decoding()
    for _ in range(3):
        batches = score_command._prefetch(i for i in range(4))
        assert next(batches) == 0
        time.sleep(0.2)  # the decoder fills the queue and waits to put the last batch
        batches.close()  # the consumer stops there
    deadline = time.monotonic() + 10
    while decoding() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not decoding() - before
