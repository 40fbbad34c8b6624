"""Restore a user's footage: a video file, a folder of frames or one image, with any kind of model.

Frames stream through: decoded one by one, restored as soon as their window is complete (windows.restore_frames:
sliding windows for DynStaticNet, tiles for any size), encoded right away, so memory depends on the frame size,
never on the length. The output takes shape under a temporary sibling name and is renamed when complete; on any
error or interrupt the temporary goes away and nothing appears under the final name. An existing output is
replaced only when the tool wrote it (a frame folder with its marker, a file of the kind written), see outputs.py.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from weather_restore.data.frames import FRAME_SUFFIXES, check_same_sizes, list_frames, read_frame, to_uint8
from weather_restore.errors import DataError
from weather_restore.model_loading import LoadedModel
from weather_restore.outputs import atomic_path, check_output_file, check_output_folder, write_marker
from weather_restore.progress import progress
from weather_restore.windows import TILE, TILE_OVERLAP, WINDOW_STRIDE, check_tiling, restore_frames, temporal_weights

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm")
# WebM holds only VP8/VP9/AV1, so a .webm input is restored into one of these.
OUTPUT_VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi")
DEFAULT_FPS = 25.0
DEFAULT_CRF = 18  # x264's "visually lossless" end: the restoration should not drown in compression artefacts


def _rgb(path: Path) -> np.ndarray:
    return to_uint8(read_frame(path))


def _video_codec() -> str:
    """H.264 where the FFmpeg build has it (PyAV's wheels do), else MPEG-4 part 2, which every build has."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


@dataclass
class RestoreSummary:
    """What `restore` did: frames, size, speed and anything the user should know about the output."""

    input: Path
    output: Path
    kind: str  # "video", "frames" or "image": the output's kind
    frames: int
    width: int
    height: int
    seconds: float
    model: str
    backend: str
    notes: list[str] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


# --- Sources: frames (uint8 RGB (H, W, 3)) with a key each: the presentation time of a video frame, or a name ----


class VideoSource:
    """A video file decoded by PyAV's FFmpeg: the first video stream, and the first audio stream's packets."""

    kind = "video"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.container = av.open(str(path))
        except av.error.FFmpegError as error:
            raise DataError(f"{path}: not a readable video ({error.strerror or error})") from None
        try:
            if not self.container.streams.video:
                raise DataError(f"{path}: has no video stream")
            self.stream = self.container.streams.video[0]
            if self.stream.codec_context is None:
                raise DataError(f"{path}: its video codec is not one this FFmpeg build (PyAV {av.__version__}) decodes")
            self.stream.thread_type = "AUTO"
            self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
            self.rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(DEFAULT_FPS)
            self.time_base = self.stream.time_base
            self.count = self.stream.frames or self._estimated_count()
            self._early_audio: list[av.Packet] = []  # audio packets demuxed before the first frame
            self._on_audio: Callable[[av.Packet], None] | None = None
            self._decoded = self._decode()
            first = next(self._decoded, None)
            if first is None:
                raise DataError(f"{path}: has no frames")
            self._first = first
            self.height, self.width = first.height, first.width
            self.rotation = first.rotation
        except BaseException:
            self.container.close()
            raise

    def _estimated_count(self) -> int | None:
        if self.stream.duration and self.time_base:
            return round(self.stream.duration * self.time_base * self.rate)
        if self.container.duration:
            return round(self.container.duration / av.time_base * self.rate)
        return None

    def _decode(self) -> Iterator[av.VideoFrame]:
        streams = [self.stream] + ([self.audio] if self.audio else [])
        decoded, last_pts = 0, None
        try:
            for packet in self.container.demux(streams):
                if packet.stream.type == "audio":
                    if packet.dts is not None:
                        (self._on_audio or self._early_audio.append)(packet)
                    continue
                for frame in packet.decode():
                    decoded += 1
                    if frame.pts is not None:
                        last_pts = frame.pts if last_pts is None else max(last_pts, frame.pts)
                    yield frame
        except av.error.FFmpegError as error:
            raise DataError(f"{self.path}: cannot decode frame {decoded + 1} ({error.strerror or error})") from None
        self._check_complete(decoded, last_pts)

    def _check_complete(self, decoded: int, last_pts: int | None) -> None:
        """A file cut short (a copy that stopped, a download that broke) demuxes without an error: what decoded
        must reach the end of the stream its header announces (an edit list's end, not all stored frames)."""
        listed = self.stream.frames
        if self.stream.duration and self.time_base and last_pts is not None:
            start = self.stream.start_time or 0
            decoded_s = float((last_pts - start) * self.time_base + 1 / self.rate)
            listed_s = float(self.stream.duration * self.time_base)
            if decoded_s >= listed_s - 2 / float(self.rate):  # the last frames' durations may differ a little
                return
            listed = listed or round(listed_s * float(self.rate))
            span = f" ({decoded_s:.2f} s of {listed_s:.2f} s)"
        elif listed and decoded < listed:
            span = ""
        else:
            return
        raise DataError(
            f"{self.path}: truncated or damaged: decoded {decoded} of {listed} frames{span}; nothing was written"
        )

    def frames(self, on_audio: Callable[[av.Packet], None] | None = None) -> Iterator[tuple[np.ndarray, object]]:
        """Every frame with its presentation time; audio packets go to `on_audio` as they are demuxed."""
        self._on_audio = on_audio or (lambda packet: None)  # from now on, not kept: sent or dropped
        for packet in self._early_audio:
            self._on_audio(packet)
        self._early_audio = []
        yield self._first.to_ndarray(format="rgb24"), self._first.pts
        for number, frame in enumerate(self._decoded, start=2):
            if (frame.height, frame.width) != (self.height, self.width):
                raise DataError(
                    f"{self.path}: frame {number} is {frame.width}x{frame.height}, the first {self.width}x{self.height}"
                )
            yield frame.to_ndarray(format="rgb24"), frame.pts

    def close(self) -> None:
        self.container.close()


class FolderSource:
    """A folder of image files of one size, in natural order (2.png before 10.png)."""

    kind = "frames"
    audio = None
    rotation = 0

    def __init__(self, path: Path):
        self.path = path
        self.paths = list_frames(path)
        if not self.paths:
            raise DataError(f"{path}: no frames ({', '.join(FRAME_SUFFIXES)}) in the folder")
        self.height, self.width = check_same_sizes(self.paths)
        self.count = len(self.paths)
        self.rate = None

    def frames(self, on_audio: object = None) -> Iterator[tuple[np.ndarray, object]]:
        for path in self.paths:
            yield _rgb(path), path.stem

    def close(self) -> None:
        pass


class ImageSource(FolderSource):
    """One image file: a clip of one frame (the video model sees it mirrored into a window)."""

    kind = "image"

    def __init__(self, path: Path):
        self.path = path
        self.paths = [path]
        self.height, self.width = _rgb(path).shape[:2]
        self.count = 1
        self.rate = None


Source = VideoSource | FolderSource


def open_source(path: Path) -> Source:
    """The frames behind INPUT: a folder of frames, an image or a video file, told apart by what and how named."""
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in FRAME_SUFFIXES:
        return ImageSource(path)
    if suffix in VIDEO_SUFFIXES:
        return VideoSource(path)
    raise DataError(
        f"{path}: unsupported input '{suffix or path.name}': give a video ({' '.join(VIDEO_SUFFIXES)}), "
        f"an image ({' '.join(FRAME_SUFFIXES)}) or a folder of frames"
    )


# --- Sinks -----------------------------------------------------------------------------------------------------


def output_kind(path: Path, source: Source) -> str:
    """What OUTPUT's name asks for: a video file, an image (for one input image) or, with no suffix, a folder."""
    suffix = path.suffix.lower()
    if suffix in OUTPUT_VIDEO_SUFFIXES:
        return "video"
    if suffix in FRAME_SUFFIXES:
        if source.kind != "image":
            raise DataError(f"{path}: an image holds one frame; write the {source.kind} to a video or a folder")
        return "image"
    if suffix:
        raise DataError(
            f"{path}: unsupported output '{suffix}': give a video ({' '.join(OUTPUT_VIDEO_SUFFIXES)}), "
            f"an image ({' '.join(FRAME_SUFFIXES)}) or a folder name without a suffix"
        )
    return "frames"


class VideoSink:
    """H.264 (yuv420p) in the container OUTPUT's suffix names, at the source's frame rate and time stamps, with the
    source's audio packets copied as they are (no re-encoding) where the container takes their codec."""

    def __init__(self, path: Path, source: Source, width: int, height: int, fps: float, crf: int, notes: list[str]):
        self.container = av.open(str(path), "w")
        codec = _video_codec()
        if codec != "libx264":
            notes.append("this FFmpeg build has no libx264: encoded as MPEG-4 part 2")
        # yuv420p stores colour at half resolution, so both sides must be even: repeat the last row/column.
        self.pad = (height % 2, width % 2)
        if any(self.pad):
            notes.append(f"{width}x{height} padded to {width + self.pad[1]}x{height + self.pad[0]} (yuv420p)")
        if source.kind == "video":
            rate, time_base = source.rate, source.time_base
        else:
            rate = Fraction(str(fps)).limit_denominator(1001)
            time_base = 1 / rate
        if codec == "mpeg4":
            time_base = 1 / rate  # MPEG-4 part 2 takes time bases up to 1/65535 only: frames are renumbered
        self.keep_pts = source.kind == "video" and time_base == source.time_base
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width + self.pad[1], height + self.pad[0]
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = time_base
        self.stream.time_base = time_base
        if codec == "libx264":
            self.stream.options = {"crf": str(crf)}
        if source.rotation:
            self.stream.set_display_rotation(source.rotation)  # phones store portrait video rotated
        self.time_base, self.rate = time_base, rate
        self.audio = None
        if source.audio is not None and source.audio.codec_context is None:
            notes.append("audio not carried over: its codec is unknown to this FFmpeg build")
        elif source.audio is not None:
            try:
                self.audio = self.container.add_stream_from_template(source.audio)
            except ValueError:
                notes.append(
                    f"audio ({source.audio.codec_context.name}) not carried over: the {path.suffix} container "
                    "does not take it; write .mkv to keep it"
                )
            else:
                notes.append(f"audio ({source.audio.codec_context.name}) copied")
        self.index, self.last_pts = 0, None

    def write(self, rgb: np.ndarray, key: object) -> None:
        if any(self.pad):
            rgb = np.pad(rgb, ((0, self.pad[0]), (0, self.pad[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        pts = key if self.keep_pts and key is not None else round(self.index / self.rate / self.time_base)
        if self.last_pts is not None and pts <= self.last_pts:  # the encoder wants strictly increasing times
            pts = self.last_pts + 1
        frame.pts, frame.time_base = pts, self.time_base
        self.index, self.last_pts = self.index + 1, pts
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def write_audio(self, packet: av.Packet) -> None:
        if self.audio is not None:
            packet.stream = self.audio
            self.container.mux(packet)

    def close(self) -> None:
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        finally:
            self.container.close()


class FolderSink:
    """PNG frames in a folder: the input frames' names, or 000000.png, 000001.png, ... for a video; and the marker
    that lets a later run replace the folder."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True)
        write_marker(path, "restore")
        self.index = 0
        self.audio = None

    def write(self, rgb: np.ndarray, key: object) -> None:
        name = key if isinstance(key, str) else f"{self.index:06d}"
        Image.fromarray(rgb).save(self.path / f"{name}.png", format="PNG")
        self.index += 1

    def close(self) -> None:
        pass


class ImageSink:
    """One image, in the format OUTPUT's suffix names."""

    def __init__(self, path: Path, suffix: str):
        self.path, self.suffix = path, suffix
        self.audio = None

    def write(self, rgb: np.ndarray, key: object) -> None:
        format = Image.registered_extensions()[self.suffix]
        Image.fromarray(rgb).save(self.path, format=format, **({"quality": 95} if format == "JPEG" else {}))

    def close(self) -> None:
        pass


def _is_video(path: Path) -> bool:
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.video)
    except (av.error.FFmpegError, OSError):
        return False


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises anything from OSError to SyntaxError for a file that is not an image
        return False
    return True


def check_output(output_path: Path, input_path: Path, kind: str, force: bool = False) -> Path:
    """Refuse an OUTPUT that would replace what the tool did not write, or the input; returns it made absolute."""
    if kind == "frames":
        return check_output_folder(output_path, "restore", [input_path], force)
    return check_output_file(output_path, kind, _is_video if kind == "video" else _is_image, [input_path], force)


# --- The stage -------------------------------------------------------------------------------------------------


def restore(
    input_path: Path,
    output_path: Path,
    model: LoadedModel,
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
    stride: int = WINDOW_STRIDE,
    compare: bool = False,
    fps: float = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    force: bool = False,
) -> RestoreSummary:
    """Restore INPUT (video file, folder of frames or image) into OUTPUT (kind from its name) with `model`.

    compare: each output frame is the input and the restored frame side by side. fps: the frame rate of a video
    made from frames or an image (a video keeps its own). force: replace an existing OUTPUT the tool did not
    write (never the input, a folder holding it, or a folder for a file).
    """
    check_tiling(tile, overlap)
    temporal_weights(stride=stride)  # refuses a stride outside 1..window before anything is opened
    input_path, output_path = Path(input_path), Path(output_path)
    source = open_source(input_path)
    try:
        kind = output_kind(output_path, source)
        final = check_output(output_path, input_path, kind, force)
        width = source.width * (2 if compare else 1)
        notes: list[str] = []
        pending: deque[tuple[np.ndarray | None, object]] = deque()  # inputs whose restoration is not out yet
        started = time.perf_counter()
        written = 0
        with atomic_path(final) as temporary:
            if kind == "video":
                sink = VideoSink(temporary, source, width, source.height, fps, crf, notes)
            elif kind == "frames":
                sink = FolderSink(temporary)
            else:
                sink = ImageSink(temporary, output_path.suffix.lower())
            try:

                def inputs() -> Iterator[np.ndarray]:
                    for rgb, key in source.frames(sink.write_audio if sink.audio is not None else None):
                        pending.append((rgb if compare else None, key))
                        yield rgb

                restored_frames = restore_frames(inputs(), model, tile, overlap, stride)
                label = f"{input_path.name} ({model.name}, {model.backend})"
                for restored in progress(restored_frames, total=source.count, desc=label, unit="frame"):
                    original, key = pending.popleft()
                    sink.write(restored if original is None else np.concatenate([original, restored], axis=1), key)
                    written += 1
            finally:
                sink.close()
    finally:
        source.close()
    seconds = time.perf_counter() - started
    for note in notes:
        log.info("%s: %s", output_path, note)
    return RestoreSummary(
        input=input_path,
        output=output_path,
        kind=kind,
        frames=written,
        width=width,
        height=source.height,
        seconds=seconds,
        model=model.name,
        backend=model.backend,
        notes=notes,
    )
