"""Photo intake: check the selfies a member sends with /train and prepare them for training.

Every photo goes through the same steps, and the first one it fails rejects it with a reason in plain
words: size of the file, real format (sniffed from the bytes, never from the name), size in pixels
(read from the header before any pixel is decoded), decoding, shortest side, one face (person-like
classes), sharpness, near-duplicates. Accepted photos are cropped square around the face (or the
subject), resized to the training resolution and written as metadata-free RGB PNGs.

This module runs inside the Discord bot process: it imports Pillow, pillow-heif, OpenCV and numpy,
never torch.
"""

from __future__ import annotations

import functools
import io
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from bot.config import IntakeSection

# Phones send HEIC; this adds the "HEIF" format to Pillow's registry (once per process).
pillow_heif.register_heif_opener()

PERSON_CLASSES = frozenset(
    {
        "person", "man", "woman", "boy", "girl", "child", "kid",
        "guy", "lady", "baby", "teen", "teenager", "people", "human",
    }
)  # fmt: skip

SUPPORTED = "send JPEG, PNG, WebP or HEIC"
# The file names of those formats: what a folder of photos or a message's attachments are searched for.
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif"})
# Faces are searched on a greyscale copy whose long side is at most this many pixels, for faces at
# least MIN_FACE_FRACTION of its shortest side wide, in steps of FACE_SCALE_STEP: a selfie's face is
# far above that minimum, and the search takes ~50 ms of CPU on the benchmark photo (steps of 1.1
# and faces down to 1/12 took ~115 ms and found the same face).
DETECT_SIDE = 640
MIN_FACE_FRACTION = 1 / 10
FACE_SCALE_STEP = 1.15
# A second face narrower than this fraction of the largest one is ignored: passers-by far behind you
# and the detector's rare false positives are small, a second person beside you is about your size.
OTHER_FACE_FRACTION = 0.5
# The square crop is this many face widths wide (room for hair and shoulders), with the face centred
# horizontally and its centre at this fraction of the height (a little above the middle).
FACE_CROP_FACTOR = 2.8
FACE_CENTRE_Y = 0.4
# A face narrower than this fraction of the resolution (in the photo's own pixels) gets a warning: the
# crop cannot be FACE_CROP_FACTOR face widths without upscaling, so the face gets under ~40% of the
# width it would ideally have in the prepared photo. Only low-resolution photos get here (a face must be MIN_FACE_FRACTION of
# the shortest side to be found at all).
SMALL_FACE_RATIO = 0.15
# Sharpness is the variance of the Laplacian of the face region (person classes) resized to
# BLUR_FACE_SIDE, or of the whole prepared crop resized to BLUR_CROP_SIDE (other classes). Measured on
# the test photos prepared at 512 (astronaut: face | whole crops of astronaut / cat / cup, the cat and
# cup enlarged to 512 px high first):
#   original                   face 701   crops 1662 / 468 / 1203
#   JPEG quality 85 / 60       face 689 / 546   crops >= 458
#   GaussianBlur radius 1      face 110   crops 540 / 162 / 335
#   GaussianBlur radius 2      face 49    crops 121 / 30 / 61
#   GaussianBlur radius 3      face 18    crops 41 / 11 / 20
#   GaussianBlur radius 4      face 15    crops 19 / 6 / 10
# 40 rejects radius 4 with a 2x margin, the (recompressed) originals pass with an 11x margin, and
# radius 2, soft but still usable, falls either side.
BLUR_FACE_SIDE = 128
BLUR_CROP_SIDE = 256
BLUR_THRESHOLD = 40.0
# Near-duplicates: Hamming distance between 64-bit dHashes of the prepared crops. Measured: the same
# photo recompressed at JPEG quality 85 or 60: 0-1, blurred (radius <= 2): 0-8; the same head framed
# differently or on other backdrops: 17 and more; the three test photos against each other: 30-37.
DUPLICATE_MAX_DISTANCE = 10
# Backgrounds: mean CIE Lab colour of the strips beside the head. Two backgrounds within this distance
# (delta E 1976) count as the same; measured: one backdrop behind five differently framed heads 2-12,
# five clearly different backdrops 39 and more.
BACKGROUND_MAX_DELTA_E = 15.0
# Warn when at least this share of the accepted photos (and at least 3) have one background.
BACKGROUND_SHARE = 0.6
# The format is told from a file's first bytes: magic numbers, brands, an SVG tag, text or not.
SNIFF_BYTES = 4096
# Discord refuses messages over 2000 characters; leave room for a mention or a heading.
MESSAGE_LIMIT = 1900

# Magic numbers of formats we recognise only to name them in a rejection.
_NAMED_FORMATS = (
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"8BPS", "a Photoshop document"),
    (b"\x00\x00\x01\x00", "an icon file"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"%PDF", "a PDF document"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5", b"3g2a"}

Box = tuple[float, float, float, float]  # x, y, width, height


@dataclass(frozen=True)
class PhotoVerdict:
    file: str  # the name as the member gave it: display only, never used as a path
    accepted: bool
    reason: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class IntakeReport:
    photos: list[PhotoVerdict]
    warnings: list[str]
    ok: bool
    prepared: list[Path]

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "warnings": list(self.warnings),
            "photos": [
                {"file": p.file, "accepted": p.accepted, "reason": p.reason, "warnings": list(p.warnings)}
                for p in self.photos
            ],
        }

    def format(self, *, markdown: bool = True) -> str:
        """One line per photo, the set's warnings and a verdict, in under MESSAGE_LIMIT characters.

        When it does not fit, photos accepted without remarks are folded into one line first, then the
        last photo lines are cut ("… and N more"); warnings and the verdict are always shown.
        `markdown=False` is for a terminal: file names as they are, no code spans, and no length limit.
        """
        accepted = sum(p.accepted for p in self.photos)
        if self.ok:
            verdict = f"Ready: {accepted} photo{'s' * (accepted != 1)} will be used for training."
        else:
            verdict = f"Not ready: {accepted} of {len(self.photos)} photos accepted, see above."
        tail = [_clip(f"⚠️ {w}", 300) for w in self.warnings] + [verdict]
        lines = [_photo_line(p, markdown) for p in self.photos]

        def text(body: list[str]) -> str:
            return "\n".join([*body, *tail])

        if not markdown or len(text(lines)) < MESSAGE_LIMIT:
            return text(lines)
        plain = [p.accepted and not p.warnings for p in self.photos]
        lines = [line for line, fold in zip(lines, plain, strict=True) if not fold]
        if any(plain):
            lines.insert(0, f"✅ {sum(plain)} photos accepted without remarks")
        shown = len(lines)
        while shown and len(text([*lines[:shown], f"… and {len(lines) - shown} more"])) >= MESSAGE_LIMIT:
            shown -= 1
        more = [f"… and {len(lines) - shown} more"] if shown < len(lines) else []
        return text([*lines[:shown], *more])


def check_photos(
    photos: Sequence[tuple[str, bytes]],
    class_word: str,
    output_dir: Path | None,
    settings: IntakeSection,
    resolution: int = 512,
) -> IntakeReport:
    """Check (name, raw bytes) photos; with an output_dir, write the accepted ones there as NN.png.

    NN is the photo's 0-based position in `photos`, so rejected photos leave gaps; output_dir None
    checks only and writes nothing.
    """
    items = [(name, functools.partial(_memory_source, data)) for name, data in photos]
    return _check(items, class_word, output_dir, settings, resolution)


def check_files(
    paths: Sequence[Path],
    class_word: str,
    output_dir: Path | None,
    settings: IntakeSection,
    resolution: int = 512,
    *,
    names: Sequence[str] | None = None,
) -> IntakeReport:
    """check_photos on files, each read from disk as the checks need it, never whole into memory; a
    file over settings.max_bytes is not read at all. `names` are what the report calls the photos
    (default: the files' names)."""
    paths = [Path(path) for path in paths]
    if names is None:
        names = [path.name for path in paths]
    elif len(names) != len(paths):
        raise ValueError(f"check_files: {len(names)} names for {len(paths)} files")
    return _check(
        [(name, functools.partial(_file_source, path)) for name, path in zip(names, paths, strict=True)],
        class_word,
        output_dir,
        settings,
        resolution,
    )


class _Rejected(Exception):
    """A photo failed a check; the message is the reason shown to the member."""


@dataclass(frozen=True)
class _Source:
    """A photo's bytes, in memory or in a file: each step opens it again and reads what it needs."""

    size: int
    open: Callable[[], BinaryIO]

    def head(self, count: int) -> bytes:
        with self.open() as file:
            return file.read(count)


@dataclass
class _Prepared:
    image: Image.Image  # resolution x resolution, RGB, no metadata
    face: Box | None  # the face in the prepared image's pixels (person classes)
    warnings: list[str]


def _check(
    items: Sequence[tuple[str, Callable[[], _Source]]],
    class_word: str,
    output_dir: Path | None,
    settings: IntakeSection,
    resolution: int,
) -> IntakeReport:
    person = class_word.strip().lower() in PERSON_CLASSES
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    verdicts: list[PhotoVerdict] = []
    prepared: list[Path] = []
    hashes: list[tuple[int, str]] = []
    backgrounds: list[np.ndarray] = []
    for index, (name, load) in enumerate(items):
        if index >= settings.max_photos:
            verdicts.append(PhotoVerdict(name, False, f"over the limit of {settings.max_photos} photos"))
            continue
        try:
            photo = _prepare(load(), person, settings, resolution)
            sharpness = _sharpness(photo.image, photo.face)
            if sharpness < BLUR_THRESHOLD:
                raise _Rejected(f"blurry (sharpness {sharpness:.0f} < {BLUR_THRESHOLD:.0f})")
            digest = _dhash(photo.image)
            for earlier_digest, earlier_name in hashes:
                if (digest ^ earlier_digest).bit_count() <= DUPLICATE_MAX_DISTANCE:
                    raise _Rejected(f"near-duplicate of {earlier_name}")
        except _Rejected as rejection:
            verdicts.append(PhotoVerdict(name, False, str(rejection)))
            continue
        hashes.append((digest, name))
        if photo.face is not None:
            backgrounds.append(_background_colour(photo.image, photo.face))
        if output_dir is not None:
            path = output_dir / f"{index:02d}.png"
            # Fastest compression: the trainer reads each file once, and its size hardly matters.
            photo.image.save(path, format="PNG", compress_level=1)
            prepared.append(path)
        verdicts.append(PhotoVerdict(name, True, None, photo.warnings))

    warnings = []
    accepted = sum(v.accepted for v in verdicts)
    if accepted < settings.min_photos:
        missing = settings.min_photos - accepted
        warnings.append(
            f"only {accepted} photo{'s' * (accepted != 1)} accepted: at least {settings.min_photos} "
            f"needed, send {missing} more"
        )
    if _shared_background(backgrounds):
        warnings.append(
            "most of your photos share the same background; vary the places, or the model learns "
            "the background as part of you"
        )
    return IntakeReport(verdicts, warnings, accepted >= settings.min_photos, prepared)


def _memory_source(data: bytes) -> _Source:
    return _Source(len(data), functools.partial(io.BytesIO, data))


def _file_source(path: Path) -> _Source:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise _Rejected(_unreadable(error)) from None
    return _Source(size, functools.partial(_open_file, path))


def _open_file(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as error:
        raise _Rejected(_unreadable(error)) from None


def _unreadable(error: OSError) -> str:
    return f"could not read the file ({error.strerror or error})"


def _prepare(source: _Source, person: bool, settings: IntakeSection, resolution: int) -> _Prepared:
    if source.size > settings.max_bytes:
        raise _Rejected(too_big(source.size, settings.max_bytes))
    decoder = _Decoder(source, _sniff(source))
    # Pixel count and shortest side do not depend on the EXIF orientation: check them on the header.
    stored_w, stored_h = decoder.stored_size
    ceiling = settings.max_pixels
    if Image.MAX_IMAGE_PIXELS:
        # Never above Pillow's decompression-bomb guard, so its warning cannot fire either.
        ceiling = min(ceiling, Image.MAX_IMAGE_PIXELS)
    if stored_w * stored_h > ceiling:
        raise _Rejected(
            f"image is too large: {stored_w}x{stored_h} pixels, the limit is {ceiling / 1e6:.0f} megapixels"
        )
    shortest = min(stored_w, stored_h)
    if shortest < resolution:
        raise _Rejected(
            f"too small: {stored_w}x{stored_h}, needs at least {resolution} px on the shortest side"
        )
    warnings = []
    if shortest < settings.warn_below_side:
        warnings.append(
            f"only {shortest} px on the shortest side: {settings.warn_below_side} or more gives better results"
        )

    # One decode serves both the face search and a crop down to half the shortest side, a selfie's
    # usual; a smaller face decodes again, sharper, below (JPEG only: other formats decode once, whole).
    needed = resolution / (shortest / 2 if person else shortest)
    first = decoder.upright(min(1.0, max(DETECT_SIDE / max(stored_w, stored_h), needed)))
    width, height = decoder.size
    to_detect = min(1.0, DETECT_SIDE / max(width, height))
    detect_size = (max(1, round(width * to_detect)), max(1, round(height * to_detect)))
    gray = np.asarray(first.convert("L").resize(detect_size, Image.Resampling.BOX))
    face: Box | None = None
    if person:
        faces = _find_faces(gray)
        if not faces:
            raise _Rejected("no face found: use a photo where your face is clearly visible")
        widest = max(f[2] for f in faces)
        if sum(f[2] >= OTHER_FACE_FRACTION * widest for f in faces) > 1:
            raise _Rejected("more than one person: crop to just you")
        x, y, w, h = (v / to_detect for v in max(faces, key=lambda f: f[2]))
        if w < SMALL_FACE_RATIO * resolution:
            warnings.append(
                f"your face is only {w:.0f} px wide: a closer photo ({SMALL_FACE_RATIO * resolution:.0f} px "
                "or more) gives the model more detail"
            )
        # Never smaller than the output, so nothing is upscaled: a small face just fills less of it.
        side = min(max(FACE_CROP_FACTOR * w, resolution), width, height)
        left = _clamp(x + w / 2 - side / 2, 0, width - side)
        top = _clamp(y + h / 2 - FACE_CENTRE_Y * side, 0, height - side)
        k = resolution / side
        face = ((x - left) * k, (y - top) * k, w * k, h * k)
    else:
        side = min(width, height)
        centre_x, centre_y = (c / to_detect for c in _subject_centre(gray))
        left = _clamp(centre_x - side / 2, 0, width - side)
        top = _clamp(centre_y - side / 2, 0, height - side)

    source = decoder.upright(resolution / side)
    sx, sy = source.width / width, source.height / height
    box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
    crop = source.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    crop = _to_srgb(crop, decoder.icc_profile)
    crop.info.clear()  # resize copies info (ICC, EXIF, text): the prepared PNG carries none of it
    return _Prepared(crop, face, warnings)


def _sniff(source: _Source) -> str:
    """The Pillow format name for an accepted format, from the magic bytes; _Rejected otherwise."""
    data = source.head(SNIFF_BYTES)
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        compatible = {data[i : i + 4] for i in range(16, min(len(data), 64), 4)}
        if brand in _AVIF_BRANDS or (
            brand == b"mif1" and compatible & _AVIF_BRANDS and b"heic" not in compatible
        ):
            raise _Rejected(f"an AVIF image is not supported: {SUPPORTED}")
        if brand in _HEIF_BRANDS:
            return "HEIF"
        if brand in _VIDEO_BRANDS:
            raise _Rejected("a video is not supported: send a photo")
    if data.startswith((b"GIF87a", b"GIF89a")):
        try:
            with source.open() as file:
                animated = getattr(Image.open(file, formats=["GIF"]), "n_frames", 1) > 1
        except Exception:  # a damaged GIF is rejected all the same
            animated = False
        raise _Rejected(
            "animated GIFs are not supported" if animated else f"a GIF image is not supported: {SUPPORTED}"
        )
    for magic, what in _NAMED_FORMATS:
        if data.startswith(magic):
            raise _Rejected(f"{what} is not supported: {SUPPORTED}")
    head = data.decode("utf-8", errors="replace")
    if "<svg" in head.lower():
        raise _Rejected(f"an SVG drawing is not supported: {SUPPORTED}")
    if not head:
        raise _Rejected("not an image (the file is empty)")
    readable = sum(c != "\ufffd" and (c.isprintable() or c.isspace()) for c in head)
    raise _Rejected(
        f"not an image (the file is {'text' if readable >= 0.95 * len(head) else 'unknown data'})"
    )


# The header readers behind Image.open, keyed by the names _sniff returns.
_HEADER_READERS: dict[str, Callable[[io.BytesIO], Image.Image]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "HEIF": pillow_heif.HeifImageFile,
}


class _Decoder:
    """One photo, decoded upright on demand at the smallest scale a step needs.

    JPEG decodes at 1/2, 1/4 or 1/8 scale when that keeps enough pixels (Pillow's draft), which makes a
    12-megapixel photo several times cheaper; other formats decode once at full size.
    """

    def __init__(self, source: _Source, fmt: str) -> None:
        self.source, self.format = source, fmt
        # The header alone, through the format's plugin: Image.open raises its decompression-bomb error
        # before the size could be reported. Decoding (upright) goes through Image.open, guard on.
        with source.open() as file:
            try:
                header = _HEADER_READERS[fmt](file)
                self.stored_size = header.size
                animated = fmt in ("PNG", "WEBP") and getattr(header, "n_frames", 1) > 1
            except Exception:  # decoders raise many exception types on hostile input
                raise _Rejected("the file is damaged or incomplete") from None
        if animated:
            raise _Rejected(
                f"an animated {'WebP' if fmt == 'WEBP' else fmt} is not supported: send a still photo"
            )
        self.size = self.stored_size  # upright, known for sure once decoded
        self.icc_profile: bytes | None = None
        self._image: Image.Image | None = None
        self._scale = 0.0

    def upright(self, scale: float) -> Image.Image:
        """The photo in RGB, EXIF orientation applied, at least `scale` times its full size."""
        if self._image is not None and self._scale >= scale:
            return self._image
        # Everything that reads the file happens before it is closed: _rgb's image holds only pixels.
        with self.source.open() as file:
            try:
                image = Image.open(file, formats=[self.format])
                if self.format == "JPEG":
                    w, h = image.size
                    image.draft(image.mode, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
                image.load()
                # Orientations 5-8 turn the picture a quarter. Read after load: a PNG's eXIf may follow IDAT.
                turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                self.size = self.stored_size[::-1] if turned else self.stored_size
                self._scale = min(1.0, image.width / self.stored_size[0])
                self.icc_profile = image.info.get("icc_profile")
                ImageOps.exif_transpose(image, in_place=True)
                self._image = _rgb(image)
            except Image.DecompressionBombError:  # a backstop: our own ceiling is below Pillow's guard
                w, h = self.stored_size
                raise _Rejected(f"image is too large: {w}x{h} pixels") from None
            except Exception:  # a truncated file lands here: LOAD_TRUNCATED_IMAGES stays off
                raise _Rejected("the file is damaged or incomplete") from None
        return self._image


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale: scale to 8 bits, not clip
        image = image.point(lambda v: v / 256)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


@functools.lru_cache(maxsize=8)
def _srgb_transform(icc_profile: bytes) -> ImageCms.ImageCmsTransform | None:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        if source.profile.xcolor_space != "RGB ":
            return None
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "RGB", "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None


def _to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """Phones shoot in Display P3; training treats pixels as sRGB, so convert rather than drop the profile."""
    transform = _srgb_transform(icc_profile) if icc_profile else None
    return ImageCms.applyTransform(image, transform) if transform else image


_detector = threading.local()  # OpenCV's CascadeClassifier and CLAHE are not safe to share between threads


def _find_faces(gray: np.ndarray) -> list[Box]:
    """Frontal faces in a greyscale image, each found by OpenCV's alt2 cascade and confirmed by the default.

    alt2 leads: on 80 crops of the test face (15-55% of the frame, mirrored, two heights) it found each
    exactly once, where the default cascade missed 5, boxed 4 twice and fired on the cat and the cup.
    """
    if not hasattr(_detector, "primary"):
        cascades = Path(cv2.data.haarcascades)
        _detector.primary = cv2.CascadeClassifier(str(cascades / "haarcascade_frontalface_alt2.xml"))
        _detector.confirm = cv2.CascadeClassifier(str(cascades / "haarcascade_frontalface_default.xml"))
        _detector.clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    # Local (CLAHE) rather than global equalisation: it lifts a backlit face just as well, but a global
    # histogram is dominated by a plain background and washed out the face in 7 of 10 test photos.
    gray = _detector.clahe.apply(gray)
    min_side = max(24, round(min(gray.shape) * MIN_FACE_FRACTION))
    found = _detector.primary.detectMultiScale(gray, FACE_SCALE_STEP, 5, minSize=(min_side, min_side))
    faces = []
    for x, y, w, h in found:
        # The second cascade looks only around the candidate (cheap), with finer steps and a lower bar
        # (it missed none of the 80 there): what both agree on is very rarely anything but a face.
        m = w // 4
        roi = gray[max(0, y - m) : y + h + m, max(0, x - m) : x + w + m]
        near = round(w * 0.6)
        if len(_detector.confirm.detectMultiScale(roi, 1.1, 3, minSize=(near, near))):
            faces.append((float(x), float(y), float(w), float(h)))
    return faces


def _subject_centre(gray: np.ndarray) -> tuple[float, float]:
    """Centre of mass of the edges: where the detail (usually the subject) is, for non-person crops."""
    small = gray.astype(np.float32)
    edges = np.abs(cv2.Sobel(small, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(small, cv2.CV_32F, 0, 1))
    total = float(edges.sum())
    if total == 0:
        return gray.shape[1] / 2, gray.shape[0] / 2
    cx = float(edges.sum(axis=0) @ np.arange(gray.shape[1])) / total
    cy = float(edges.sum(axis=1) @ np.arange(gray.shape[0])) / total
    return cx, cy


def _sharpness(image: Image.Image, face: Box | None) -> float:
    """Variance of the Laplacian at a fixed size: of the face region, or of the whole crop."""
    if face is None:
        region = image.convert("L").resize((BLUR_CROP_SIDE, BLUR_CROP_SIDE), Image.Resampling.BOX)
    else:
        x, y, w, h = face
        box = (max(0.0, x), max(0.0, y), min(image.width, x + w), min(image.height, y + h))
        region = image.convert("L").resize((BLUR_FACE_SIDE, BLUR_FACE_SIDE), Image.Resampling.BOX, box=box)
    return float(cv2.Laplacian(np.asarray(region, dtype=np.float32), cv2.CV_32F).var())


def _dhash(image: Image.Image) -> int:
    """64-bit difference hash: is each cell of a 9x8 thumbnail brighter than its left neighbour."""
    cells = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    return int.from_bytes(np.packbits(cells[:, 1:] > cells[:, :-1]).tobytes(), "big")


def _background_colour(image: Image.Image, face: Box) -> np.ndarray:
    """Mean CIE Lab colour beside the head: from the top of the crop to the chin, left and right of the
    hair (the face box widened by half)."""
    side = 64
    rgb = np.asarray(image.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    k = side / image.width
    x, y, w, h = (v * k for v in face)
    mask = np.zeros((side, side), dtype=bool)
    mask[: max(1, math.ceil(y + h))] = True
    mask[:, max(0, math.floor(x - w / 4)) : math.ceil(x + w * 5 / 4)] = False
    return lab[mask].mean(axis=0) if mask.any() else lab.reshape(-1, 3).mean(axis=0)


def _shared_background(colours: list[np.ndarray]) -> bool:
    """True when at least BACKGROUND_SHARE of the photos (3 or more) have backgrounds of one colour."""
    if len(colours) < 3:
        return False
    points = np.stack(colours)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    largest_group = int((distances <= BACKGROUND_MAX_DELTA_E).sum(axis=1).max())
    return largest_group >= max(3, math.ceil(BACKGROUND_SHARE * len(colours)))


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(value, high))


def too_big(size: int | None, limit: int) -> str:
    """The reason a file over `limit` bytes is refused; `size` None: its download was stopped at the limit."""
    if size is None:
        return f"the file is too big: over the limit of {limit / 2**20:.0f} MB"
    return f"the file is too big: {size / 2**20:.1f} MB, the limit is {limit / 2**20:.0f} MB"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _photo_line(photo: PhotoVerdict, markdown: bool) -> str:
    # Names are the member's: never a newline, and in Markdown no backtick, which would end the code span.
    name = "".join(c if c.isprintable() and (c != "`" or not markdown) else "?" for c in photo.file) or "?"
    if markdown:
        if len(name) > 48:  # keep both ends: "IMG_2024…_0042.HEIC" tells photos apart, the middle rarely does
            name = name[:28] + "…" + name[-19:]
        name = f"`{name}`"
    if not photo.accepted:
        return _clip(f"❌ {name}: {photo.reason}", 300)
    return _clip(f"✅ {name}" + "".join(f" ⚠️ {w}" for w in photo.warnings), 300)
