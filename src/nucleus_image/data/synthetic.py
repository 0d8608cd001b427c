"""The synthetic compositional domain: coloured shapes on plain or lightly textured backgrounds, one scene type
per GenEval task (single_object, two_object, counting, colors, position, color_attr), with shapes standing in
for COCO classes. Everything is a pure function of (seed, index): the same seed writes byte-identical files.

    nucleus data synth --out data/synth --num 2000 --seed 0 [--size 128]

writes `DIR/images/*.png`, the Parquet manifest `DIR/manifest-vNNNN/part-*.parquet` (schema in
`nucleus_image.data.manifest`), `DIR/heldout_metadata.jsonl` (held-out prompts in GenEval's metadata format)
and `DIR/preview.png`.

Curriculum columns (the manifest's `bucket` and `tier` carry this domain's difficulty):

| bucket | scene                     | base difficulty |
|--------|---------------------------|-----------------|
| 1      | single_object             | 1               |
| 2      | colors                    | 1               |
| 3      | two_object                | 2               |
| 4      | counting, 2 objects       | 2               |
| 5      | color_attr                | 3               |
| 6      | counting, 3 objects       | 3               |
| 7      | position                  | 4               |
| 8      | counting, 4 objects       | 4               |

tier = base difficulty + 1 on a textured background (so 1..5). `quality_score` is 1.0: renderings are exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nucleus_image.data.captions import CAPTION_SOURCES, captions_for, geneval_prompt
from nucleus_image.data.scene import Scene, SceneObject

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
# Object colours: GenEval colour names, chosen far apart in RGB and never a tint of one another, so a blurred
# edge (a mix of a colour with the light background) stays nearer its own colour than any other.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (245, 125, 0),
    "yellow": (245, 220, 25),
    "green": (35, 155, 50),
    "blue": (30, 75, 215),
    "purple": (130, 40, 170),
    "brown": (115, 65, 25),
    "black": (20, 20, 20),
}
# Light, unsaturated backgrounds: every object colour is far from all of them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 246),
    "light gray": (208, 208, 208),
    "beige": (236, 226, 202),
    "pale blue": (212, 226, 240),
    "pale green": (216, 236, 218),
}
TEXTURES = ("plain", "grain", "stripes", "gradient", "checker")
RELATIONS = ("left of", "right of", "above", "below")
# Object size classes as fractions of the image's short side (the side of the object's square box), for scenes
# of two objects; scaled by COUNT_SCALE for other counts. Objects are large on purpose: at the demo's 32 px and
# 4 px tokens a lone object spans 3.5-5.5 tokens and the smallest of four still ~2, so shapes differ across
# whole tokens (and survive the detector at the resolution the demo samples at).
SIZE_CLASSES: dict[str, tuple[float, float]] = {"small": (0.30, 0.34), "medium": (0.34, 0.38), "large": (0.38, 0.42)}
COUNT_SCALE = {1: 1.3, 2: 1.0, 3: 0.85, 4: 0.8}
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "3:2": (3, 2),
    "2:3": (2, 3),
}
# GenEval's relation rule: centres must differ by more than this share of the summed box sizes per axis.
POSITION_THRESHOLD = 0.1
_SUPERSAMPLE = 4


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale a polygon so it exactly fills [-1, 1]^2: every shape then fills its box, and the detector can
    render a template for any detected box."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return tuple((2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in points)


_STAR = [
    (r * math.cos(math.radians(-90 + 36 * k)), r * math.sin(math.radians(-90 + 36 * k)))
    for k, r in zip(range(10), [1.0, 0.5] * 5)
]
_ARM = 0.4  # the cross's arm half-width in box units: thick enough to survive downsampling to ~8 px
POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    "star": _normalised(_STAR),
    "cross": (
        (-_ARM, -1),
        (_ARM, -1),
        (_ARM, -_ARM),
        (1, -_ARM),
        (1, _ARM),
        (_ARM, _ARM),
        (_ARM, 1),
        (-_ARM, 1),
        (-_ARM, _ARM),
        (-1, _ARM),
        (-1, -_ARM),
        (-_ARM, -_ARM),
    ),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw `shape` filling the box (x0, y0, x1, y1); shared by the renderer and the detector's templates."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
        return
    sx, sy = (x1 - x0) / 2, (y1 - y0) / 2
    draw.polygon([(x0 + (u + 1) * sx, y0 + (v + 1) * sy) for u, v in POLYGONS[shape]], fill=fill)


def relative_position(box_a, box_b) -> set[str]:
    """Relations of box A to box B by GenEval's rule (boxes are (x0, y0, x1, y1), y down): the centre offset,
    shrunk per axis by POSITION_THRESHOLD times the summed box sizes, normalised by the offset's length; an axis
    whose share exceeds 0.5 gives its relation. The generator places position scenes with it and the scorer
    checks with it, so captions and scores agree."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


@dataclass(frozen=True)
class SynthConfig:
    """What the generator draws from. `size` is the short side in pixels; the long side follows the aspect
    ratio, rounded to a multiple of 8."""

    size: int = 128
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    aspect_ratios: tuple[str, ...] = tuple(ASPECT_RATIOS)
    textured_fraction: float = 0.5
    # Harder scenes are drawn more often: the curriculum can still down-weight them early via `bucket`.
    task_weights: dict[str, float] = field(
        default_factory=lambda: {
            "single_object": 1.0,
            "two_object": 1.5,
            "counting": 2.0,
            "colors": 1.0,
            "position": 2.0,
            "color_attr": 2.0,
        }
    )

    def __post_init__(self):
        if not isinstance(self.size, int) or not 32 <= self.size <= 4096:
            raise ValueError(f"size {self.size!r} must be an integer short side in 32..4096 pixels")
        for name, values, allowed in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, tuple(COLORS)),
            ("aspect_ratios", self.aspect_ratios, tuple(ASPECT_RATIOS)),
        ):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} {list(values)!r} invalid ({bad or 'empty'}); accepted: {list(allowed)}")
        if len(self.shapes) < 2 or len(self.colors) < 2:
            raise ValueError("two_object and color_attr scenes need at least 2 shapes and 2 colors")
        bad = {k: v for k, v in self.task_weights.items() if k not in TASKS or v < 0}
        if bad or sum(self.task_weights.values()) <= 0:
            raise ValueError(f"task_weights {self.task_weights!r} invalid; keys from {list(TASKS)}, weights >= 0")
        if not 0.0 <= self.textured_fraction <= 1.0:
            raise ValueError(f"textured_fraction {self.textured_fraction!r} must be in [0, 1]")

    def image_size(self, aspect: str) -> tuple[int, int]:
        w, h = ASPECT_RATIOS[aspect]
        long = int(round(self.size * max(w, h) / min(w, h) / 8)) * 8
        return (long, self.size) if w > h else (self.size, long) if h > w else (self.size, self.size)


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _place(rng, shapes_colors, width, height, relation=None) -> tuple[SceneObject, ...]:
    """Random non-touching placement (boxes at least 8% of the short side apart and 4% from the border; sizes by
    class, scaled by the object count);
    with `relation` (rel, subject, reference) the pair must stand in exactly that GenEval relation."""
    short = min(width, height)
    margin, gap = 0.04 * short, 0.08 * short
    classes = [_choice(rng, tuple(SIZE_CLASSES)) for _ in shapes_colors]
    scale = COUNT_SCALE[min(len(shapes_colors), max(COUNT_SCALE))]
    sizes = [float(rng.uniform(*SIZE_CLASSES[c])) * short * scale for c in classes]
    for attempt in range(2000):
        if attempt and attempt % 200 == 0:  # crowded: shrink and keep trying, deterministically
            sizes = [s * 0.9 for s in sizes]
        objs = []
        for (shape, color), cls, s in zip(shapes_colors, classes, sizes):
            cx = float(rng.uniform(margin + s / 2, width - margin - s / 2))
            cy = float(rng.uniform(margin + s / 2, height - margin - s / 2))
            objs.append(SceneObject(shape, color, cls, s, cx, cy))
        if any(_too_close(a, b, gap) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            continue
        if relation and relative_position(objs[relation[1]].bbox, objs[relation[2]].bbox) != {relation[0]}:
            continue
        return tuple(objs)
    raise ValueError(f"cannot place {len(shapes_colors)} objects in {width}x{height} pixels")


def _too_close(a: SceneObject, b: SceneObject, gap: float) -> bool:
    return abs(a.cx - b.cx) < (a.size + b.size) / 2 + gap and abs(a.cy - b.cy) < (a.size + b.size) / 2 + gap


def scene_for_metadata(record: dict, rng: np.random.Generator, config: SynthConfig = SynthConfig()) -> Scene:
    """A scene that satisfies a GenEval-style record (colours not named are drawn at random): the ground
    truth the compositional scorer must accept."""
    aspect = _choice(rng, config.aspect_ratios)
    width, height = config.image_size(aspect)
    items, relation = [], None
    for entry in record["include"]:
        color = entry.get("color") or _choice(rng, config.colors)
        if "position" in entry:
            relation = (entry["position"][0], len(items), _first_index(record, entry["position"][1]))
        items.extend([(entry["class"], color)] * int(entry["count"]))
    background = _choice(rng, tuple(BACKGROUNDS))
    texture = _choice(rng, TEXTURES[1:]) if rng.random() < config.textured_fraction else "plain"
    objs = _place(rng, items, width, height, relation)
    return Scene(record["tag"], width, height, aspect, background, texture, objs, relation)


def _first_index(record: dict, group: int) -> int:
    return sum(int(e["count"]) for e in record["include"][:group])


def sample_scene(rng: np.random.Generator, config: SynthConfig = SynthConfig()) -> Scene:
    """One training scene: pick a task by weight, then the objects it needs."""
    tasks = [t for t in TASKS if config.task_weights.get(t, 0) > 0]
    weights = np.array([config.task_weights[t] for t in tasks], dtype=np.float64)
    task = tasks[int(rng.choice(len(tasks), p=weights / weights.sum()))]
    shapes, colors = config.shapes, config.colors
    if task in ("single_object", "colors"):
        record = {"tag": task, "include": [{"class": _choice(rng, shapes), "count": 1}]}
    elif task == "counting":
        record = {"tag": task, "include": [{"class": _choice(rng, shapes), "count": int(rng.integers(2, 5))}]}
    else:
        a, b = (shapes[int(i)] for i in rng.choice(len(shapes), 2, replace=False))
        record = {"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]}
        if task == "color_attr":
            ca, cb = (colors[int(i)] for i in rng.choice(len(colors), 2, replace=False))
            record["include"][0]["color"], record["include"][1]["color"] = ca, cb
        if task == "position":
            record["include"][1]["position"] = [_choice(rng, RELATIONS), 0]
    return scene_for_metadata(record, rng, config)


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 float32 background; textures stay within about +-12 levels so objects remain far from it."""
    h, w = scene.height, scene.width
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    short = min(h, w)
    if scene.texture == "grain":
        delta = np.clip(rng.normal(0.0, 4.0, (h, w)), -10, 10)
    elif scene.texture == "stripes":
        angle = rng.uniform(0, np.pi)
        delta = 7.0 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / (short / rng.uniform(5, 10)))
    elif scene.texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        delta = 24.0 * (proj - proj.min()) / max(float(np.ptp(proj)), 1.0) - 12.0
    elif scene.texture == "checker":
        cell = short / rng.uniform(6, 10)
        delta = 6.0 * (((xx // cell) + (yy // cell)) % 2 * 2 - 1)
    else:
        delta = np.zeros((h, w), np.float32)
    return base[None, None, :] + delta[..., None].astype(np.float32)


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene anti-aliased (shapes supersampled 4x, box-filtered) so edges stay crisp when resized."""
    rng = rng if rng is not None else np.random.default_rng(0)
    out = _background(scene, rng)
    ss = _SUPERSAMPLE
    layer = Image.new("RGB", (scene.width * ss, scene.height * ss))
    alpha = Image.new("L", layer.size)
    draw_c, draw_a = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    for obj in scene.objects:
        # A slight per-object colour jitter, so "red" is a neighbourhood and not one RGB triple.
        rgb = tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in COLORS[obj.color])
        box = tuple(v * ss for v in obj.bbox)
        draw_shape(draw_c, obj.shape, box, rgb)
        draw_shape(draw_a, obj.shape, box, 255)
    # Box-filtered, the colour layer is premultiplied by coverage (objects never overlap).
    color = np.asarray(layer.reduce(ss), dtype=np.float32)
    a = np.asarray(alpha.reduce(ss), dtype=np.float32)[..., None] / 255.0
    out = out * (1.0 - a) + color
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def phash_uint64(image: Image.Image) -> int:
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """Each image has its own stream: image i is the same whatever --num is."""
    return np.random.default_rng([int(seed), int(index)])


def annotations_json(scene: Scene) -> str:
    return json.dumps(scene.annotations(), sort_keys=True, separators=(",", ":"))


def scene_relations(scene: Scene) -> dict[tuple[int, int], set[str]]:
    return {
        (i, j): relative_position(a.bbox, b.bbox)
        for i, a in enumerate(scene.objects)
        for j, b in enumerate(scene.objects)
        if i != j
    }


def make_example(seed: int, index: int, config: SynthConfig = SynthConfig()) -> tuple[Scene, Image.Image, list[str]]:
    """Scene, rendered image and its four captions (low to high quality) for one (seed, index)."""
    rng = scene_rng(seed, index)
    scene = sample_scene(rng, config)
    image = render(scene, rng)
    return scene, image, captions_for(scene, rng, scene_relations(scene))


def heldout_metadata(
    seed: int = 0, per_task: int = 24, config: SynthConfig = SynthConfig(), repeat: bool = False
) -> list[dict]:
    """Held-out prompts in GenEval's metadata format (tag, include [{class, count, color?, position?}],
    exclude, prompt), shapes as classes, in GenEval's task order. Each task takes `per_task` of its
    combinations (all of them when fewer), drawn with `seed`. With `repeat`, a task with fewer combinations
    lists all of them in as many whole rounds as reach `per_task` records (6 shapes -> 4 rounds of 6 for 24), so
    every task gets about as many images and its score an interval of about the same width; a scorer samples each
    record with its own seeds. Prompts use GenEval's "a photo of ..." phrasing, which no training caption uses."""
    from itertools import combinations, permutations, product

    if per_task < 1:
        raise ValueError(f"per_task {per_task!r} must be >= 1")
    shapes, colors = config.shapes, config.colors
    pools = {
        "single_object": [[{"class": s, "count": 1}] for s in shapes],
        "two_object": [[{"class": a, "count": 1}, {"class": b, "count": 1}] for a, b in combinations(shapes, 2)],
        "counting": [[{"class": s, "count": n}] for s, n in product(shapes, (2, 3, 4))],
        "colors": [[{"class": s, "count": 1, "color": c}] for s, c in product(shapes, colors)],
        "position": [
            [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [r, 0]}]
            for (a, b), r in product(permutations(shapes, 2), RELATIONS)
        ],
        "color_attr": [
            [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
            for (a, b), (ca, cb) in product(permutations(shapes, 2), permutations(colors, 2))
        ],
    }
    rng = np.random.default_rng([int(seed), 1_000_003])
    records = []
    for tag in TASKS:
        pool = pools[tag]
        picks = sorted(rng.choice(len(pool), min(per_task, len(pool)), replace=False).tolist())
        if repeat and len(pool) < per_task:
            picks = picks * -(-per_task // len(pool))
        for k in picks:
            record = {"tag": tag, "include": pool[k]}
            if tag == "counting":
                record["exclude"] = [{"class": pool[k][0]["class"], "count": pool[k][0]["count"] + 1}]
            record["prompt"] = geneval_prompt(record)
            records.append(record)
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def preview_grid(images: list[Image.Image], cell: int = 96, cols: int = 8) -> Image.Image:
    rows = max(1, math.ceil(len(images) / cols))
    grid = Image.new("RGB", (cols * cell, rows * cell), (255, 255, 255))
    for k, im in enumerate(images):
        thumb = im.copy()
        thumb.thumbnail((cell - 4, cell - 4), Image.Resampling.LANCZOS)
        grid.paste(
            thumb, ((k % cols) * cell + (cell - thumb.width) // 2, (k // cols) * cell + (cell - thumb.height) // 2)
        )
    return grid


def generate_dataset(
    out: str | Path,
    num: int,
    seed: int = 0,
    config: SynthConfig = SynthConfig(),
    heldout_per_task: int = 24,
    progress: bool = True,
    heldout_repeat: bool = False,
) -> Path:
    """Write `num` images to out/images (named by content hash, so older manifests stay valid), a new
    manifest version, the held-out prompts and a preview grid. Returns the manifest version folder."""
    import pyarrow as pa

    from nucleus_image.data.manifest import SCHEMA, next_version_dir, partition_key_for, write_shard
    from nucleus_image.progress import progress as progress_bar

    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num {num!r} must be a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed {seed!r} must be a non-negative integer")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cols = {f.name: [] for f in SCHEMA}
    previews = []
    for index in progress_bar(range(num), desc="synthesizing", unit="img", disable=not progress):
        scene, image, captions = make_example(seed, index, config)
        data = png_bytes(image)
        sha = sha256_hex(data)
        image_id = sha[:32]
        path = out / "images" / f"{image_id}.png"
        if not path.exists():
            tmp = path.with_suffix(".png.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        for key, value in (
            ("image_id", image_id),
            ("image_path", f"images/{image_id}.png"),
            ("sha256", sha),
            ("phash", phash_uint64(image)),
            ("width", scene.width),
            ("height", scene.height),
            ("quality_score", 1.0),
            ("tier", scene.tier),
            ("bucket", scene.bucket),
            ("captions", captions),
            ("caption_sources", list(CAPTION_SOURCES)),
            ("partition_key", partition_key_for(sha)),
            ("annotations", annotations_json(scene)),
        ):
            cols[key].append(value)
        if index < 32:
            previews.append(image)
    table = pa.table(cols, schema=SCHEMA)
    version_dir = next_version_dir(out)
    num_shards = max(1, math.ceil(num / 10_000))
    provenance = {
        "generator": "nucleus_image.data.synthetic",
        "seed": seed,
        "num": num,
        "size": config.size,
        "shapes": list(config.shapes),
        "colors": list(config.colors),
        "aspect_ratios": list(config.aspect_ratios),
        "textured_fraction": config.textured_fraction,
        "task_weights": config.task_weights,
    }
    keys = np.asarray(cols["partition_key"]) % num_shards
    for shard in range(num_shards):
        rows = np.flatnonzero(keys == shard)
        write_shard(table.take(pa.array(rows)), version_dir / f"part-{shard:05d}.parquet", provenance)
    write_jsonl(heldout_metadata(0, heldout_per_task, config, heldout_repeat), out / "heldout_metadata.jsonl")
    preview_grid(previews).save(out / "preview.png")
    return version_dir


def ground_truth_images(
    records: list[dict], samples: int = 4, seed: int = 0, config: SynthConfig = SynthConfig()
) -> list[list[Image.Image]]:
    """`samples` correct renderings per GenEval-style record: the reference a scorer must accept."""
    out = []
    for index, record in enumerate(records):
        images = []
        for k in range(samples):
            rng = np.random.default_rng([int(seed), index, k, 7])
            images.append(render(scene_for_metadata(record, rng, config), rng))
        out.append(images)
    return out
