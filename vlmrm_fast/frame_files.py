"""Frames from files, for ``vlmrm-fast score``: a video or GIF (decoded by ffmpeg through imageio-ffmpeg), an
image, or a folder of images. Each frame is RGB uint8 [H, W, 3] on the host, with a label for the CSV's
``source`` column (a file name, or a time in seconds).

:func:`open_frames` checks a source before any model loads; every failure is a
:class:`~vlmrm_fast.argtypes.CLIError` that names the fix.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vlmrm_fast.argtypes import CLIError, require_cli_extra
from vlmrm_fast.callers import stacklevel_outside_package

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
VIDEO_STREAM = "0:V:0"  # the first video stream that is not cover art; the frames and their times agree
NO_PTS = -(2**63)  # ffmpeg's AV_NOPTS_VALUE, as framecrc prints a packet without a timestamp

#: One decoded frame: RGB uint8 array [H, W, 3] and the text for the CSV ``source`` column.
LabelledFrame = tuple[np.ndarray, str]


def open_frames(path: Path) -> ImageFiles | VideoFile:
    """Open ``path`` as a frame source, checking it before any model is loaded."""
    if not path.exists():
        raise CLIError(f"'{path}' does not exist; give a video file or a folder of images")
    if path.is_dir():
        return ImageFiles(list_images(path))
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        # One image: a damaged or animated one is refused before the model loads, not after.
        return ImageFiles([path], read={path: read_image(path)})
    if suffix in VIDEO_EXTENSIONS:
        return VideoFile.open(path)
    raise CLIError(
        f"'{path}' has an unsupported file type '{path.suffix}'; give a video "
        f"({', '.join(VIDEO_EXTENSIONS)}), an image or a folder of images "
        f"({', '.join(IMAGE_EXTENSIONS)}), or convert it, e.g. ffmpeg -i '{path}' clip.mp4"
    )


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, in natural order.

    Hidden files (such as macOS ``._frame1.png`` companions) and our own ``*.rewards.png``
    plots are skipped.
    """
    images = [p for p in folder.iterdir() if _is_frame_file(p)]
    if not images:
        raise CLIError(
            f"no images found in folder '{folder}' (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "point PATH at a folder of frames or at a video file"
        )
    return sorted(images, key=natural_key)


def _is_frame_file(path: Path) -> bool:
    """Whether a folder entry is an input frame (see :func:`list_images`)."""
    name = path.name.lower()
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not name.startswith(".")
        and not name.endswith(".rewards.png")
        and path.is_file()
    )


def natural_key(path: Path) -> tuple:
    """Sort key that orders embedded numbers by value: frame2 < frame10.

    ``re.split`` with a capturing group alternates text and digits, so keys compare
    str with str and int with int at every position. Names equal by that measure (frame1 and
    frame01, Frame1 and frame1) are ordered by their plain names, not by the directory listing.
    """
    parts = re.split(r"(\d+)", path.name)
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts)), path.name


@dataclass
class ImageFiles:
    """Frames from image files, each converted to RGB uint8; labelled by file name."""

    files: list[Path]
    read: dict[Path, np.ndarray] = field(default_factory=dict)
    """Frames already read, by file: handed out once, then read again."""

    @property
    def total(self) -> int:
        """Number of frames."""
        return len(self.files)

    def __iter__(self) -> Iterator[LabelledFrame]:
        for file in self.files:
            frame = self.read.pop(file, None)
            yield (read_image(file) if frame is None else frame), printable_name(file.name)


def printable_name(text: str) -> str:
    """``text`` (a file name) as UTF-8 text: bytes of a name that are not UTF-8 (a Latin-1 name from an old archive),
    which Python keeps as lone surrogates that no UTF-8 file, terminal or font takes, written as ``\\xff`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_image(path: Path) -> np.ndarray:
    """Read one image as RGB uint8 [H, W, 3], upright as viewers show it (EXIF orientation applied, as
    videos get their rotation), alpha dropped, greyscale expanded, 16-bit greyscale reduced to its
    high byte; 32-bit integer and float images are refused: their range is unknown."""
    image_module = require_cli_extra("PIL.Image", "pillow")
    try:
        with image_module.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1 and opened.format != "MPO":  # a camera's JPEG may carry a preview as a second picture
                raise CLIError(
                    f"image '{path}' is animated ({frames} frames), but an image is scored as one frame (its first); "
                    "to score every frame, save them as a folder of images and score the folder, e.g. in Python, with "
                    "PIL's Image and ImageSequence imported: for i, f in enumerate(ImageSequence.Iterator(Image.open("
                    "path))): f.convert('RGB').save(f'frames/{i}.png')"
                )
            image = _upright(opened, image_module)
            if image.mode.startswith("I;16"):  # PIL's convert("RGB") would clip every value above 255
                grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if image.mode in ("I", "F"):
                raise CLIError(
                    f"image '{path}' is {'32-bit integer' if image.mode == 'I' else 'floating point'} greyscale "
                    "(PIL mode " + image.mode + "), whose range is unknown; save it as 8-bit RGB (or 16-bit) first"
                )
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise CLIError(
            f"cannot read image '{path}' ({exc}); re-export it, or remove it from the folder"
        ) from None
    except image_module.DecompressionBombError as exc:  # not an OSError: it left score with a traceback
        raise CLIError(
            f"cannot read image '{path}' ({exc}); scale it down (frames are resized to the model's input size "
            "anyway), re-export it if its header is damaged, or remove it from the folder"
        ) from None


#: EXIF orientation -> the PIL transpose that shows the image upright (PIL.ImageOps.exif_transpose's table).
_TRANSPOSES = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
               7: "TRANSVERSE", 8: "ROTATE_90"}


def _upright(image: Any, image_module: Any) -> Any:
    """``image`` (PIL) turned as its EXIF orientation says; as stored where its EXIF cannot be parsed, as viewers
    show it then. Not PIL's ``exif_transpose``: after turning the image it writes the EXIF again without the
    orientation, which raises on a damaged tag that matters nothing here (struct.error, TypeError)."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # Orientation, from the EXIF or else the XMP
    except Exception:  # a damaged EXIF block; PIL's parser raises SyntaxError, struct.error and others
        orientation = 1
    method = _TRANSPOSES.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(getattr(image_module.Transpose, method))


@dataclass
class VideoFile:
    """Frames decoded by ffmpeg (imageio-ffmpeg), streamed: one per frame stored in the file (no frames
    repeated or dropped to reach a constant rate, which ffmpeg's default does to a GIF whose frames
    have different durations); labelled by presentation time."""

    path: Path
    fps: Optional[float]
    size: tuple[int, int]  # (width, height) of the decoded frames
    total: Optional[int]
    #: Seconds from the first frame, one per stored frame in display order, from the container's
    #: timestamps; None where they could not be read (the labels are then frame / fps).
    timestamps: Optional[list[float]] = None
    #: The last error ffmpeg reported while reading the file's packets ("File ended prematurely", "partial
    #: file"): the file is cut short or damaged, and frames past that point are missing. None where it read cleanly.
    read_error: Optional[str] = None

    @classmethod
    def open(cls, path: Path) -> VideoFile:
        """Probe the video (size, fps, frame timestamps) so that a bad file fails early."""
        ffmpeg = require_cli_extra("imageio_ffmpeg", "imageio-ffmpeg")
        with contextlib.closing(_read_frames(ffmpeg, path)) as reader:
            meta = _next_frame(reader, path)
        fps = meta.get("fps") or None
        timestamps, read_error = _list_packets(ffmpeg, path)
        total: Optional[int]
        if timestamps is not None:
            total = len(timestamps)
        else:
            duration = meta.get("duration")
            total = round(fps * duration) if fps and duration else None
        return cls(path, fps, tuple(meta["size"]), total, timestamps, read_error)

    def __iter__(self) -> Iterator[LabelledFrame]:
        ffmpeg = require_cli_extra("imageio_ffmpeg", "imageio-ffmpeg")
        width, height = self.size
        with contextlib.closing(_read_frames(ffmpeg, self.path)) as reader:
            _next_frame(reader, self.path)  # the metadata dict
            index = 0
            while (raw := _next_frame(reader, self.path, None)) is not None:
                frame = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
                yield frame, self._label(index)
                index += 1
        if index == 0:
            raise CLIError(f"no frames could be decoded from '{self.path}'; check that it plays")
        problem = self._missing_frames(index)
        if problem is not None:
            warnings.warn(problem, stacklevel=stacklevel_outside_package())

    def _missing_frames(self, decoded: int) -> Optional[str]:
        """The warning for a video that decoded to ``decoded`` frames, or None where nothing is amiss: frames
        missing (fewer decoded than the container lists, or ffmpeg reporting an error on reading it: the file cut
        short or damaged), or more decoded than listed (the times in the source column may then be off)."""
        listed = None if self.timestamps is None else len(self.timestamps)
        missing = listed is not None and decoded < listed
        cut_short = self.read_error is not None and (TRUNCATED.search(self.read_error) is not None or listed is None)
        if missing or cut_short:
            cause = (f"ffmpeg reports: {self.read_error}" if cut_short
                     else f"ffmpeg could not decode {(listed or 0) - decoded} of the {listed} frames it holds")
            found = f" of the {listed} it holds" if missing and cut_short else ""
            times = ", and the times in the source column may be off after the first missing one" if missing else ""
            return (f"frames are missing from '{self.path}': it may be cut short or damaged ({cause}); scored the "
                    f"{decoded} frames it decoded{found}{times}; check that it plays to the end, or get a whole copy "
                    "of it (the rewards of the frames scored are right, those of the missing ones are absent)")
        if listed is not None and decoded > listed:
            return (f"ffmpeg decoded {decoded} frames from '{self.path}' but its container lists {listed}, so the "
                    f"times in the source column may be off; re-encode it for exact ones: "
                    f"ffmpeg -i '{self.path}' -c:v libx264 fixed.mp4")
        return None

    def _label(self, index: int) -> str:
        """The ``source`` column of frame ``index``: its time in seconds, or '' where unknown."""
        if self.timestamps is not None and index < len(self.timestamps):
            return f"{self.timestamps[index]:.4f}"
        return f"{index / self.fps:.4f}" if self.fps else ""


TRUNCATED = re.compile(r"partial file|ended prematurely|truncat|end of file|\bEOF\b", re.IGNORECASE)
"""ffmpeg's read errors that mean a file cut short (the listing, and so the frame count, stops at the cut). Another
error reading a file whose every listed frame decoded (a demuxer's complaint about another stream) loses no frame."""


def _read_frames(ffmpeg, path: Path) -> Generator[Any, None, None]:
    """imageio-ffmpeg's frame generator: a metadata dict, then raw RGB24 frames, one per stored frame."""
    options = ["-map", VIDEO_STREAM, *_passthrough_option(ffmpeg)]
    return ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=options)


def _next_frame(reader: Iterator, path: Path, *default):
    """``next(reader)``, turning ffmpeg failures into a short :class:`CLIError`."""
    try:
        return next(reader, *default)
    except (OSError, RuntimeError) as exc:
        if "matches no streams" in str(exc):
            raise CLIError(f"'{path}' has no video stream (only audio or cover art?); give a video") from None
        lines = [line for line in str(exc).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(exc).__name__
        raise CLIError(
            f"cannot read video '{path}' (ffmpeg: {reason}); check that it plays, or "
            f"re-encode it: ffmpeg -i '{path}' -c:v libx264 fixed.mp4"
        ) from None


def _passthrough_option(ffmpeg) -> list[str]:
    """ffmpeg's option to pass frames through at their own times (ffmpeg 5.1 renamed ``-vsync``
    to ``-fps_mode``, and 8 removed the old name)."""
    version = ffmpeg.get_ffmpeg_version()
    match = re.match(r"n?(\d+)\.(\d+)", version)
    if match is not None and (int(match[1]), int(match[2])) < (5, 1):
        return ["-vsync", "passthrough"]
    return ["-fps_mode", "passthrough"]  # 5.1 or newer, or a development build ("N-...")


DISCARD_FLAG = 0x4
"""AV_PKT_FLAG_DISCARD, in framecrc's ``F=0x..`` field: a packet the decoder drops."""


def _list_packets(ffmpeg, path: Path) -> tuple[Optional[list[float]], Optional[str]]:
    """The presentation times of the first video stream's frames (cover art aside), in seconds from the first,
    sorted; and the last error ffmpeg reported reading its packets, or None: a file cut short ("File ended
    prematurely", "partial file") or damaged.

    Read from the packets of a stream copy (no decoding) in ffmpeg's framecrc format: a ``#tb 0:
    NUM/DEN`` header, then ``stream, dts, pts, duration, size, hash`` per packet, and ``F=0x..`` where
    a packet has flags. Packets flagged discard (before an edit list's start, as a stream-copied trim
    leaves them) are never decoded, so they have no frame. The times are None where ffmpeg fails or a
    packet has no timestamp. The packets of a file cut short are those before the cut, so its frame count
    agrees with what decodes: only the error tells that frames are missing.
    """
    command = [ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path),
               "-map", VIDEO_STREAM, "-c", "copy", "-f", "framecrc", "-"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    except subprocess.CalledProcessError as exc:
        return None, _last_error(exc.stderr)
    except (OSError, subprocess.SubprocessError):
        return None, None
    return _parse_framecrc(done.stdout), _last_error(done.stderr)


def _last_error(stderr: Optional[str]) -> Optional[str]:
    """ffmpeg's last error line (``-v error``), without its ``[demuxer @ 0x...]`` prefix; None where there is none."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    return re.sub(r"^(\[[^]]*\]\s*)+", "", lines[-1]) if lines else None


def _parse_framecrc(listing: str) -> Optional[list[float]]:
    """The sorted presentation times, from the first, of a framecrc listing (see :func:`_list_packets`)."""
    timebase, pts = None, []
    for line in listing.splitlines():
        if line.startswith("#tb 0:"):
            num, den = line.split(":", 1)[1].strip().split("/")
            timebase = int(num) / int(den)
        elif line and not line.startswith("#"):
            fields = [field.strip() for field in line.split(",")]
            flags = next((field[2:] for field in fields[6:] if field.startswith("F=")), "0")
            if int(flags, 16) & DISCARD_FLAG:
                continue
            if len(fields) < 3 or not fields[2].lstrip("-").isdigit() or int(fields[2]) == NO_PTS:
                return None
            pts.append(int(fields[2]))
    if timebase is None or not pts:
        return None
    first = min(pts)
    return [(value - first) * timebase for value in sorted(pts)]
