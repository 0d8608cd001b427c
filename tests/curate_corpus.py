"""An adversarial curation corpus built on the fly, with the outcome every input must have.

`build(root)` writes folders, a WebDataset tar and a Parquet table under root and returns
{source: expected reason or "kept"} plus a few named sources the tests look at. Images are just above the
256 px minimum so the whole corpus curates in a few seconds.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

GOOD_CAPTION = "A {c} kite flies above a sandy beach while two children run along the waterline at sunset."
PARAGRAPH = (
    "A red bicycle leans against a brick wall in a narrow street. Morning light falls across the cobbles. "
    "A cat sleeps on the window ledge above it. Flower pots line the doorstep to the left. "
    "A blue door stands half open behind the bicycle. Shadows of a balcony stretch over the pavement."
)


def scene(seed: int, size=(288, 272)) -> Image.Image:
    """A sharp, colourful synthetic scene: gradient sky, random shapes, fine noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    base = (rng.uniform(40, 200, 3) * (1 - y) + rng.uniform(40, 200, 3) * y) * np.ones((h, w, 3))
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        box = [int(x0), int(y0), int(x0 + rng.integers(15, 110)), int(y0 + rng.integers(15, 110))]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color, outline=(0, 0, 0), width=2)
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (a decompression bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def build(root: Path) -> dict:
    root = Path(root)
    photos, extra, tabled = root / "photos", root / "extra", root / "tabled"
    for d in (photos, photos / "sub", extra, tabled):
        d.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def put(path: Path, data: bytes, outcome: str, caption: str | bytes | None = None) -> str:
        path.write_bytes(data)
        if caption is not None:
            path.with_suffix(".txt").write_bytes(caption.encode() if isinstance(caption, str) else caption)
        expect[str(path.resolve())] = outcome
        return str(path.resolve())

    colours = ["red", "green", "blue", "yellow", "orange", "purple"]
    good = [
        put(photos / f"good{i}.jpg", encode(scene(i), "JPEG", quality=92), "kept", GOOD_CAPTION.format(c=c))
        for i, c in enumerate(colours)
    ]
    # Several captions with sources, in JSON, plus a paragraph that gets derived shorter variants.
    put(photos / "multi.png", encode(scene(10), "PNG"), "kept")
    (photos / "multi.json").write_text(
        '{"captions": [{"text": "IMG_0042.jpg", "source": "alt-text"}, '
        '{"text": "a kite", "source": "user"}, '
        '{"text": "A green kite with a long tail over a crowded summer beach near the pier.", "source": "vlm:qwen"}]}'
    )
    paragraph = put(photos / "sub" / "paragraph.png", encode(scene(11), "PNG"), "kept", PARAGRAPH)
    # Modes that need normalising; all kept.
    cmyk = put(photos / "cmyk.jpg", encode(scene(12).convert("CMYK"), "JPEG"), "kept", GOOD_CAPTION.format(c="cyan"))
    pal = scene(13).convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    put(photos / "palette.png", encode(pal, "PNG", transparency=0), "kept", GOOD_CAPTION.format(c="pink"))
    grey16 = Image.fromarray(np.asarray(scene(14).convert("L"), np.uint16) * 257)  # mode I;16
    put(photos / "grey16.png", encode(grey16, "PNG"), "kept", GOOD_CAPTION.format(c="grey"))
    rgba = scene(15).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 200))
    put(photos / "alpha.png", encode(rgba, "PNG"), "kept", GOOD_CAPTION.format(c="white"))
    # EXIF orientation 6 (rotate 90): stored 320x272, shown 272x320.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = put(
        photos / "rotated.jpg", encode(scene(16, (320, 272)), "JPEG", exif=exif), "kept", GOOD_CAPTION.format(c="brown")
    )
    # Wrong extension: a PNG named .jpg (kept) and text named .png (refused).
    put(photos / "actually_png.jpg", encode(scene(17), "PNG"), "kept", GOOD_CAPTION.format(c="black"))
    put(photos / "text.png", b"hello, I am not an image\n" * 4, "not_an_image", "a caption")
    # Broken files.
    put(photos / "random.jpg", np.random.default_rng(0).bytes(3000), "not_an_image", "noise")
    full = encode(scene(18), "JPEG", quality=90)
    put(photos / "truncated.jpg", full[: len(full) // 2], "truncated", GOOD_CAPTION.format(c="gold"))
    put(photos / "empty.png", b"", "zero_byte", "empty")
    put(photos / "bomb.png", png_header_only(30000, 30000), "decompression_bomb", "bomb")
    put(photos / "huge.png", png_header_only(9000, 3000), "too_large", "huge")
    put(photos / "tiny.png", encode(scene(19, (120, 120)), "PNG"), "too_small", "tiny")
    put(photos / "wide.png", encode(scene(20, (1100, 260)), "PNG"), "aspect_ratio", "wide")
    # Duplicates: an exact byte copy, and a slightly smaller re-encode (the larger original survives).
    dup_exact = put(
        photos / "sub" / "copy_of_good0.jpg", (photos / "good0.jpg").read_bytes(), "duplicate_exact", "copy"
    )
    dup_near = put(
        photos / "sub" / "near_good1.jpg",
        encode(scene(1).resize((280, 264)), "JPEG", quality=70),
        "duplicate_near",
        GOOD_CAPTION.format(c="green"),
    )
    # Quality filters.
    put(photos / "blank.png", encode(Image.new("RGB", (280, 280), (128, 128, 128)), "PNG"), "blank", "grey")
    blurry = scene(21).filter(ImageFilter.GaussianBlur(6))
    put(photos / "blurry.png", encode(blurry, "PNG"), "blurry", GOOD_CAPTION.format(c="lilac"))
    white = Image.new("L", (300, 280), 255)
    ImageDraw.Draw(white).text((20, 20), "page 1", fill=0)
    put(photos / "overexposed.png", encode(white.convert("RGB"), "PNG"), "histogram_anomaly", "page")
    dim = np.clip(np.random.default_rng(5).normal(20, 6, (272, 288)), 0, 255).astype(np.uint8)
    put(
        photos / "dim.png",
        encode(Image.fromarray(dim).convert("RGB"), "PNG"),
        "low_quality",
        GOOD_CAPTION.format(c="x"),
    )
    # Captions: Windows-1252 bytes (repaired, kept), undecodable bytes (no caption left), none at all.
    cp1252 = put(
        photos / "cafe.jpg",
        encode(scene(22), "JPEG"),
        "kept",
        "Café crème on a wooden table by the window, with a croissant and a folded newspaper.".encode("cp1252"),
    )
    put(photos / "badbytes.jpg", encode(scene(23), "JPEG"), "no_caption", b"\x81\x8d\xff\xfe\x00garbage\x90")
    put(photos / "nocaption.jpg", encode(scene(24), "JPEG"), "no_caption")
    put(photos / "badcaption.jpg", encode(scene(25), "JPEG"), "no_caption", "DSC_0001")
    (photos / "orphan.txt").write_text("a caption whose image went missing")
    expect[str((photos / "orphan.txt").resolve())] = "orphan_caption"

    # A WebDataset shard: two samples with captions, one caption without an image, one corrupt image.
    tar_path = extra / "shard-000000.tar"
    members = {
        "s0001.jpg": encode(scene(30), "JPEG"),
        "s0001.txt": GOOD_CAPTION.format(c="teal").encode(),
        "s0002.png": encode(scene(31), "PNG"),
        "s0002.json": b'{"caption": "A lighthouse on a rocky cliff under a stormy grey sky with waves below."}',
        "s0003.txt": b"caption only",
        "s0004.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
        "s0004.txt": b"broken image",
    }
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = str(tar_path.resolve())
    for member, outcome in (
        ("s0001.jpg", "kept"),
        ("s0002.png", "kept"),
        ("s0003", "no_image"),
        ("s0004.jpg", "truncated"),
    ):
        expect[f"tar:{shard}#{member}"] = outcome

    # A Parquet table of paths and captions, one path missing.
    for i in range(2):
        (tabled / f"t{i}.jpg").write_bytes(encode(scene(40 + i), "JPEG"))
        expect[str((tabled / f"t{i}.jpg").resolve())] = "kept"
    expect[str((tabled / "gone.jpg").resolve())] = "missing_file"
    pq.write_table(
        pa.table(
            {
                "image_path": ["t0.jpg", "t1.jpg", "gone.jpg"],
                "caption": [
                    "A snowy mountain ridge under a clear blue sky with pine trees below.",
                    "Three sailboats race across a choppy bay in bright afternoon sunlight.",
                    "A caption for a file that does not exist anywhere on disk.",
                ],
            }
        ),
        tabled / "table.parquet",
    )

    return {
        "inputs": [str(photos), str(tar_path), str(tabled / "table.parquet")],
        "expect": expect,
        "good": good,
        "paragraph": paragraph,
        "cmyk": cmyk,
        "rotated": rotated,
        "dup_exact": dup_exact,
        "dup_near": dup_near,
        "cp1252": cp1252,
    }
