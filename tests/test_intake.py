"""Photo intake on the real test photos and pictures derived from them in each test."""

from __future__ import annotations

import io
import json
import re
import resource
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile, ImageFilter, ImageOps

from bot import intake
from bot.config import IntakeSection
from bot.intake import IntakeReport, PhotoVerdict, check_files, check_photos

SETTINGS = IntakeSection()
PROJECT_ROOT = Path(__file__).resolve().parent.parent
NO_FACE = "no face found: use a photo where your face is clearly visible"
UNSUPPORTED = "send JPEG, PNG, WebP or HEIC"
# The astronaut's face as the detector boxes it in the 512x512 original: x, y, width, height.
FACE = (176, 65, 96, 96)
# Her head and hair with a little of the studio backdrop, for pasting onto other backgrounds.
HEAD = (140, 10, 320, 230)


@pytest.fixture(scope="module")
def astronaut(photos_dir: Path) -> Image.Image:
    return Image.open(photos_dir / "astronaut.png").convert("RGB")


@pytest.fixture(scope="module")
def cat(photos_dir: Path) -> Image.Image:
    return Image.open(photos_dir / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module")
def cup(photos_dir: Path) -> Image.Image:
    return Image.open(photos_dir / "coffee.png").convert("RGB")


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def check_one(
    data: bytes, class_word: str = "person", resolution: int = 512, name: str = "photo"
) -> PhotoVerdict:
    return check_photos([(name, data)], class_word, None, SETTINGS, resolution).photos[0]


def prepare(data: bytes, out: Path, class_word: str = "person", resolution: int = 512) -> Image.Image:
    report = check_photos([("photo", data)], class_word, out, SETTINGS, resolution)
    assert report.photos[0].accepted, report.photos[0].reason
    with Image.open(report.prepared[0]) as image:
        return image.convert("RGB")


def faces_in(image: Image.Image) -> list[tuple[float, float, float, float]]:
    return intake._find_faces(np.asarray(image.convert("L")))


def backdrop(
    size: tuple[int, int], colour: tuple[int, int, int], seed: int, amplitude: float = 20
) -> Image.Image:
    """A smooth, blotchy backdrop of one colour: a wall, a sky, a curtain."""
    rng = np.random.default_rng(seed)
    blotches = np.clip(np.asarray(colour) + rng.normal(0, amplitude, (6, 8, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(blotches).resize(size, Image.Resampling.BICUBIC)


def pasted(
    image: Image.Image, canvas: Image.Image, offset: tuple[int, int], scale: float = 1.0
) -> Image.Image:
    canvas = canvas.copy()
    size = (round(image.width * scale), round(image.height * scale))
    canvas.paste(image.resize(size, Image.Resampling.LANCZOS), offset)
    return canvas


def png_bomb(width: int, height: int) -> bytes:
    """A genuine 1-bit greyscale PNG of zeros: a few hundred KB that decode to width*height pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the bits
    blocks = (compressor.compress(row * min(1000, height - y)) for y in range(0, height, 1000))
    idat = b"".join(blocks) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_chunks(path: Path) -> list[bytes]:
    data, kinds, at = path.read_bytes(), [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kinds.append(data[at + 4 : at + 8])
        at += 12 + length
    return kinds


def test_astronaut_is_accepted_and_prepared(astronaut: Image.Image, tmp_path: Path) -> None:
    report = check_photos([("astronaut.png", encode(astronaut))], "person", tmp_path / "out", SETTINGS)
    assert report.photos == [
        PhotoVerdict(
            "astronaut.png",
            True,
            None,
            ["only 512 px on the shortest side: 720 or more gives better results"],
        )
    ]
    assert report.prepared == [tmp_path / "out" / "00.png"]
    with Image.open(report.prepared[0]) as prepared:
        assert (prepared.format, prepared.mode, prepared.size) == ("PNG", "RGB", (512, 512))
        assert len(faces_in(prepared)) == 1


@pytest.mark.parametrize(
    ("scale", "canvas_size", "offset"),
    [
        (1.0, (1200, 900), (0, 0)),  # top left corner: the crop is pushed inside the photo
        (1.0, (1200, 900), (688, 388)),  # bottom right corner
        (1.0, (1200, 900), (344, 194)),
        (1.5, (900, 1200), (60, 300)),  # portrait
        (2.0, (1600, 1200), (300, 100)),
        (3.0, (2000, 1600), (200, 40)),  # large face: the crop is 2.8 face widths, downscaled
        # 12 megapixels: decoded at 1/2 scale to find the face, then again in full for its ~980 px crop
        (3.1, (4000, 3000), (1500, 600)),
    ],
)
def test_crop_follows_the_face(
    astronaut: Image.Image,
    tmp_path: Path,
    scale: float,
    canvas_size: tuple[int, int],
    offset: tuple[int, int],
) -> None:
    photo = pasted(astronaut, backdrop(canvas_size, (40, 90, 60), seed=1), offset, scale)
    prepared = prepare(encode(photo, "JPEG", quality=92), tmp_path)
    assert prepared.size == (512, 512)
    faces = faces_in(prepared)
    assert len(faces) == 1, "the prepared crop must contain the face (not a blind centre crop)"
    x, y, w, h = faces[0]
    face_w = FACE[2] * scale
    side = min(max(intake.FACE_CROP_FACTOR * face_w, 512), *canvas_size)
    assert w == pytest.approx(face_w * 512 / side, rel=0.2)
    # The face is centred horizontally and a little above the middle, unless the photo's edge is near.
    face_x, face_y = offset[0] + (FACE[0] + FACE[2] / 2) * scale, offset[1] + (FACE[1] + FACE[3] / 2) * scale
    if side / 2 <= face_x <= canvas_size[0] - side / 2:
        assert x + w / 2 == pytest.approx(256, abs=0.06 * 512)
    if intake.FACE_CENTRE_Y * side <= face_y <= canvas_size[1] - (1 - intake.FACE_CENTRE_Y) * side:
        assert y + h / 2 == pytest.approx(intake.FACE_CENTRE_Y * 512, abs=0.06 * 512)


@pytest.mark.parametrize(
    ("orientation", "stored_turn"), [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)]
)
def test_exif_orientation_is_applied(
    astronaut: Image.Image, tmp_path: Path, orientation: int, stored_turn: Image.Transpose
) -> None:
    upright = pasted(astronaut, backdrop((1200, 900), (150, 60, 40), seed=2), (500, 250))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    turned = encode(upright.transpose(stored_turn), "JPEG", quality=95, exif=exif)
    expected = prepare(encode(upright, "JPEG", quality=95), tmp_path / "upright")
    prepared = prepare(turned, tmp_path / "turned")
    assert len(faces_in(prepared)) == 1  # Haar finds upright faces only
    # The detector's box may differ by a pixel or two between the two JPEGs: compare at 64x64.
    small = [
        np.asarray(image.resize((64, 64), Image.Resampling.BOX), dtype=np.int16)
        for image in (prepared, expected)
    ]
    assert np.abs(small[0] - small[1]).mean() < 8


@pytest.mark.parametrize("people", [2, 3])
def test_several_people_are_rejected(astronaut: Image.Image, people: int) -> None:
    photo = backdrop((1800, 800), (200, 200, 190), seed=3)
    for i in range(people):
        photo = pasted(astronaut.crop(HEAD), photo, (80 + 600 * i, 200), scale=1.5)
    assert check_one(encode(photo, "JPEG", quality=92)).reason == "more than one person: crop to just you"


def test_no_face_for_person_classes(cat: Image.Image, cup: Image.Image) -> None:
    # chelsea.png is 451x300 and coffee.png 600x400: at resolution 256 they pass the size check.
    assert check_one(encode(cat), "person", resolution=256).reason == NO_FACE
    assert check_one(encode(cup), "woman", resolution=256).reason == NO_FACE


def test_other_classes_need_no_face(cat: Image.Image, cup: Image.Image, tmp_path: Path) -> None:
    report = check_photos([("chelsea.png", encode(cat))], "cat", tmp_path, SETTINGS, resolution=256)
    assert report.photos[0].accepted
    assert report.photos[0].warnings == ["only 300 px on the shortest side: 720 or more gives better results"]
    with Image.open(report.prepared[0]) as prepared:
        assert prepared.size == (256, 256)
    assert check_one(encode(cup), "thing", resolution=256).accepted
    assert (
        check_one(encode(cat), "cat").reason
        == "too small: 451x300, needs at least 512 px on the shortest side"
    )


def test_non_person_crop_follows_the_subject(cup: Image.Image, tmp_path: Path) -> None:
    # The cup at the right end of a wide, plain picture: a centre crop (x 500-1100) would be mostly wall.
    photo = pasted(cup, backdrop((1600, 600), (128, 128, 128), seed=4, amplitude=3), (1000, 100))
    prepared = prepare(encode(photo), tmp_path, "thing", resolution=256)
    # Where the 600x600 crop was taken: slide the prepared image along the photo at the same scale.
    scaled = np.asarray(photo.resize((round(1600 * 256 / 600), 256), Image.Resampling.LANCZOS))
    match = cv2.matchTemplate(scaled, np.asarray(prepared), cv2.TM_SQDIFF)
    left = int(match.argmin()) * 600 / 256
    assert left > 900


def test_heic_webp_and_jpeg_are_accepted(astronaut: Image.Image) -> None:
    # A phone's HEIC, stored turned with EXIF orientation 6: pillow-heif encodes it (as irot) and
    # decodes it upright, or no face would be found.
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    heic = encode(astronaut.transpose(Image.Transpose.ROTATE_90), "HEIF", quality=90, exif=exif.tobytes())
    assert heic[4:12] == b"ftypheic"
    for name, data in [
        ("IMG_0001.HEIC", heic),
        ("photo.webp", encode(astronaut, "WEBP", quality=90)),
        ("photo.jpg", encode(astronaut, "JPEG", quality=90)),
        ("named-wrong.gif", encode(astronaut, "JPEG", quality=90)),  # the bytes decide, not the name
    ]:
        verdict = check_one(data, name=name)
        assert verdict.accepted, (name, verdict.reason)


def test_transparency_and_16_bit_are_converted(astronaut: Image.Image, tmp_path: Path) -> None:
    rgba = astronaut.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 100, 100))  # a transparent corner, black underneath
    prepared = prepare(encode(rgba), tmp_path / "rgba")
    assert prepared.getpixel((10, 10)) == (255, 255, 255)
    grey = astronaut.convert("L")
    deep = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)  # 16-bit greyscale PNG
    prepared = prepare(encode(deep), tmp_path / "deep")
    assert np.asarray(prepared.convert("L")).mean() == pytest.approx(np.asarray(grey).mean(), abs=3)


def test_metadata_is_stripped(astronaut: Image.Image, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCo"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update(
        {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (48.0, 51.0, 29.0)}
    )
    photo = encode(astronaut, "JPEG", quality=95, exif=exif, comment=b"home")
    assert Image.open(io.BytesIO(photo)).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the input has GPS
    report = check_photos([("photo.jpg", photo)], "person", tmp_path, SETTINGS)
    assert set(png_chunks(report.prepared[0])) == {b"IHDR", b"IDAT", b"IEND"}
    with Image.open(report.prepared[0]) as prepared:
        assert not prepared.getexif()
        assert prepared.info == {}


def test_truncated_file_is_damaged(astronaut: Image.Image) -> None:
    data = encode(astronaut, "JPEG", quality=90)
    assert check_one(data[: len(data) * 2 // 3]).reason == "the file is damaged or incomplete"
    assert check_one(encode(astronaut)[:5000]).reason == "the file is damaged or incomplete"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_pixel_bomb_is_rejected_without_decoding() -> None:
    bomb = png_bomb(40000, 40000)
    assert len(bomb) < 300_000  # 1.6 gigapixels in 200 KB
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    verdict = check_one(bomb, name="bomb.png")
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 100 * 1024  # KiB: < 100 MB more
    assert verdict.reason == "image is too large: 40000x40000 pixels, the limit is 80 megapixels"
    # Below Pillow's own guard (89 megapixels) our ceiling still applies.
    assert check_one(png_bomb(9000, 9000)).reason == (
        "image is too large: 9000x9000 pixels, the limit is 80 megapixels"
    )


def test_rejected_formats(astronaut: Image.Image) -> None:
    small = astronaut.resize((64, 64))
    frames = [small, small.rotate(90)]
    cases = {
        "photo3.gif": (
            encode(small, "GIF", save_all=True, append_images=frames[1:]),
            "animated GIFs are not supported",
        ),
        "still.gif": (encode(small, "GIF"), f"a GIF image is not supported: {UNSUPPORTED}"),
        "photo.bmp": (encode(small, "BMP"), f"a BMP image is not supported: {UNSUPPORTED}"),
        "photo.tiff": (encode(small, "TIFF"), f"a TIFF image is not supported: {UNSUPPORTED}"),
        "moving.png": (
            encode(astronaut, "PNG", save_all=True, append_images=[astronaut.rotate(5)]),
            "an animated PNG is not supported: send a still photo",
        ),
        "moving.webp": (
            encode(astronaut, "WEBP", save_all=True, append_images=[astronaut.rotate(5)]),
            "an animated WebP is not supported: send a still photo",
        ),
        "notes.jpg": (b"remember: buy milk\nand eggs\n" * 20, "not an image (the file is text)"),
        "noise.jpg": (np.random.default_rng(0).bytes(5000), "not an image (the file is unknown data)"),
        "empty.png": (b"", "not an image (the file is empty)"),
        "tiny.png": (
            encode(Image.new("RGB", (1, 1))),
            "too small: 1x1, needs at least 512 px on the shortest side",
        ),
    }
    report = check_photos([(name, data) for name, (data, _) in cases.items()], "person", None, SETTINGS)
    assert {v.file: v.reason for v in report.photos} == {name: reason for name, (_, reason) in cases.items()}
    assert not any(v.accepted for v in report.photos)


def test_byte_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"\xff\xd8\xff" + bytes(21 * 2**20)
    assert check_one(big).reason == "the file is too big: 21.0 MB, the limit is 20 MB"
    sparse = tmp_path / "huge.jpg"
    with sparse.open("wb") as file:
        file.truncate(30 * 2**20)
    real_open = Path.open

    def guarded_open(self: Path, *args: object, **kwargs: object) -> object:
        assert self != sparse, "a file over the byte limit was opened"
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded_open)
    report = check_files([sparse], "person", None, SETTINGS)
    assert report.photos[0].reason == "the file is too big: 30.0 MB, the limit is 20 MB"


def test_near_duplicate(astronaut: Image.Image) -> None:
    photos = [("astronaut.png", encode(astronaut)), ("again.jpg", encode(astronaut, "JPEG", quality=85))]
    report = check_photos(photos, "person", None, SETTINGS)
    assert [v.reason for v in report.photos] == [None, "near-duplicate of astronaut.png"]


def test_blurry(astronaut: Image.Image) -> None:
    reason = check_one(encode(astronaut.filter(ImageFilter.GaussianBlur(4)))).reason
    assert reason is not None
    match = re.fullmatch(r"blurry \(sharpness (\d+) < (\d+)\)", reason)
    assert match, reason
    assert int(match[1]) < int(match[2]) == intake.BLUR_THRESHOLD


def test_small_face_warns(astronaut: Image.Image) -> None:
    photo = pasted(astronaut, backdrop((560, 700), (90, 90, 140), seed=5), (100, 150), scale=0.7)
    verdict = check_one(encode(photo, "JPEG", quality=95))
    assert verdict.accepted, verdict.reason
    small_face = (
        r"your face is only (\d+) px wide: a closer photo \(77 px or more\) gives the model more detail"
    )
    matches = [re.fullmatch(small_face, w) for w in verdict.warnings]
    assert [int(m[1]) for m in matches if m] == [pytest.approx(FACE[2] * 0.7, abs=5)], verdict.warnings


def test_counts_and_json(astronaut: Image.Image) -> None:
    report = check_photos(
        [("astronaut.png", encode(astronaut)), ("notes.txt", b"hi")], "person", None, SETTINGS
    )
    assert not report.ok
    assert report.prepared == []  # output_dir None: nothing written
    assert report.warnings == ["only 1 photo accepted: at least 5 needed, send 4 more"]
    data = json.loads(json.dumps(report.to_json()))
    assert data == {
        "ok": False,
        "warnings": ["only 1 photo accepted: at least 5 needed, send 4 more"],
        "photos": [
            {
                "file": "astronaut.png",
                "accepted": True,
                "reason": None,
                "warnings": ["only 512 px on the shortest side: 720 or more gives better results"],
            },
            {
                "file": "notes.txt",
                "accepted": False,
                "reason": "not an image (the file is text)",
                "warnings": [],
            },
        ],
    }
    one = IntakeSection(min_photos=1, max_photos=2)
    # The third photo is over the limit before anything is looked at (empty bytes would say so otherwise).
    report = check_photos(
        [("a.png", encode(astronaut)), ("b.txt", b"hi"), ("c.png", b"")], "person", None, one
    )
    assert report.ok and report.warnings == []
    assert [v.reason for v in report.photos] == [
        None,
        "not an image (the file is text)",
        "over the limit of 2 photos",
    ]


def test_check_files(photos_dir: Path, tmp_path: Path) -> None:
    names = ["astronaut.png", "chelsea.png", "coffee.png", "missing.jpg"]
    report = check_files([photos_dir / n for n in names], "person", tmp_path, SETTINGS, resolution=256)
    assert [(v.file, v.reason) for v in report.photos] == [
        ("astronaut.png", None),
        ("chelsea.png", NO_FACE),
        ("coffee.png", NO_FACE),
        ("missing.jpg", "could not read the file (No such file or directory)"),
    ]
    assert report.prepared == [tmp_path / "00.png"]


def test_check_files_reads_each_photo_from_disk_never_whole_into_memory(
    astronaut: Image.Image, tmp_path: Path
) -> None:
    # A big PNG (noise compresses badly): its bytes alone would be more than the budget below.
    rng = np.random.default_rng(0)
    pixels = np.asarray(astronaut.resize((2400, 2400)), dtype=np.int16) + rng.normal(0, 8, (2400, 2400, 3))
    path = tmp_path / "big.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, compress_level=1)
    size = path.stat().st_size
    assert size > 8 * 2**20
    tracemalloc.start()
    try:
        report = check_files([path], "person", tmp_path / "out", SETTINGS, names=["me.png"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(v.file, v.accepted) for v in report.photos] == [("me.png", True)]
    # Python-side allocations (tracemalloc sees bytes and numpy, not Pillow's pixels): a few blocks
    # read from the file and the small arrays the checks use.
    assert peak < size / 4, (peak, size)


def background_set(astronaut: Image.Image, colours: list[tuple[int, int, int]]) -> list[tuple[str, bytes]]:
    """Five photos of the same head, framed differently (so none is a near-duplicate of another)."""
    head = astronaut.crop(HEAD)
    framings = [(1.0, (100, 100), False), (1.5, (500, 200), True), (2.0, (300, 150), False)]
    framings += [(1.2, (700, 400), True), (1.7, (150, 300), False)]
    photos = []
    for i, ((scale, offset, mirror), colour) in enumerate(zip(framings, colours, strict=True)):
        canvas = backdrop((1000, 800), colour, seed=10 + i, amplitude=6)
        photo = pasted(ImageOps.mirror(head) if mirror else head, canvas, offset, scale)
        photos.append((f"selfie{i}.jpg", encode(photo, "JPEG", quality=92)))
    return photos


def test_background_warning(astronaut: Image.Image) -> None:
    warning = (
        "most of your photos share the same background; vary the places, or the model learns "
        "the background as part of you"
    )
    same = check_photos(background_set(astronaut, [(70, 110, 160)] * 5), "person", None, SETTINGS)
    assert all(v.accepted for v in same.photos), [v.reason for v in same.photos]
    assert same.ok and same.warnings == [warning]
    colours = [(70, 110, 160), (200, 60, 50), (60, 160, 70), (230, 220, 120), (40, 40, 40)]
    varied = check_photos(background_set(astronaut, colours), "person", None, SETTINGS)
    assert all(v.accepted for v in varied.photos), [v.reason for v in varied.photos]
    assert varied.ok and varied.warnings == []


def test_format_fits_a_discord_message() -> None:
    photos = [
        PhotoVerdict("selfie1.jpg", True, None, []),
        PhotoVerdict("photo3.gif", False, "animated GIFs are not supported", []),
        PhotoVerdict(
            "dim`\n@everyone.jpg",
            True,
            None,
            ["only 640 px on the shortest side: 720 or more gives better results"],
        ),
    ]
    text = IntakeReport(
        photos, ["only 2 photos accepted: at least 5 needed, send 3 more"], False, []
    ).format()
    assert text.splitlines() == [
        "✅ `selfie1.jpg`",
        "❌ `photo3.gif`: animated GIFs are not supported",
        "✅ `dim??@everyone.jpg` ⚠️ only 640 px on the shortest side: 720 or more gives better results",
        "⚠️ only 2 photos accepted: at least 5 needed, send 3 more",
        "Not ready: 2 of 3 photos accepted, see above.",
    ]
    # A member sends 60 photos: the first 20 are checked, the other 40 are over the limit.
    reasons = [None if i % 3 else "blurry (sharpness 12 < 40)" for i in range(20)]
    reasons += ["over the limit of 20 photos"] * 40
    many = [
        PhotoVerdict(f"{'long-name-' * 8}{i}.jpg", reason is None, reason) for i, reason in enumerate(reasons)
    ]
    text = IntakeReport(many, ["a set warning"], True, []).format()
    assert len(text) < intake.MESSAGE_LIMIT
    lines = text.splitlines()
    assert lines[0] == "✅ 13 photos accepted without remarks"
    assert lines[1] == "❌ `long-name-long-name-long-nam…ame-long-name-0.jpg`: blurry (sharpness 12 < 40)"
    assert re.fullmatch(r"… and \d+ more", lines[-3])
    assert lines[-2:] == ["⚠️ a set warning", "Ready: 13 photos will be used for training."]
