"""Pictures of routing (PNG, drawn with PIL): per-layer expert-load heatmaps over timesteps, and spatial maps of
which expert took which patch on a few images at a few timesteps.

    expert_load.png       one panel per MoE layer: rows = timesteps (sigma), columns = experts, colour = the
                          expert's share of router probability mass (top row of panels) and of tokens that prefer
                          it (bottom row), both relative to the uniform share 1/E (the colour bar tops out at 3/E)
    expert_map_layerNN.png  rows = images; the clean image, then per timestep each token coloured by the expert
                          that computed it (the highest-scoring of the experts that picked it; black = none)
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .routing import RoutingRecord, assigned_expert, load_statistics

# Anchors of a perceptually ordered dark-blue -> green -> yellow ramp (viridis' endpoints and midpoints).
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
_TAB20 = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
]
NONE_COLOR = (0, 0, 0)


def ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along the ramp."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    frac = (v - lo)[..., None]
    return np.rint(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def expert_palette(num_experts: int) -> list[tuple[int, int, int]]:
    if num_experts <= len(_TAB20):
        return _TAB20[:num_experts]
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / num_experts, 0.75, 0.95)) for k in range(num_experts)]


def heatmap_panel(matrix: np.ndarray, vmax: float, title: str, row_labels: list[str], cell: int = 14) -> Image.Image:
    rows, cols = matrix.shape
    left, top = 34, 16
    panel = Image.new("RGB", (left + cols * cell + 4, top + rows * cell + 14), "white")
    colors = ramp(matrix / vmax)
    block = np.repeat(np.repeat(colors, cell, axis=0), cell, axis=1)
    panel.paste(Image.fromarray(block), (left, top))
    draw = ImageDraw.Draw(panel)
    draw.text((left, 2), title, fill="black")
    for r, label in enumerate(row_labels):
        draw.text((2, top + r * cell + 1), label, fill="black")
    step = max(1, cols // 8)
    for c in range(0, cols, step):
        draw.text((left + c * cell + 2, top + rows * cell + 1), str(c), fill="black")
    return panel


def _row(panels: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (sum(p.width for p in panels) + 6 * len(panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 6
    return out


def _stack(images: list[Image.Image], caption: str | None = None) -> Image.Image:
    head = 14 if caption else 0
    out = Image.new("RGB", (max(im.width for im in images), head + sum(im.height for im in images)), "white")
    if caption:
        ImageDraw.Draw(out).text((2, 1), caption, fill="black")
    y = head
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def expert_load_heatmaps(record: RoutingRecord, path: str | Path) -> Path:
    """expert_load.png: router probability share (top) and preferred-expert share (bottom), per layer."""
    E = record.num_experts
    labels = [f"{s:.2f}" for s in record.sigmas]
    load_row, pref_row = [], []
    for k, layer in enumerate(record.layers):
        stats = load_statistics(record.logits[k], record.indices[k])
        load = np.array([s["router_load"] for s in stats])
        pref = np.array([s["preferred_share"] for s in stats])
        load_row.append(heatmap_panel(load * E, 3.0, f"layer {layer} router mass", labels))
        pref_row.append(heatmap_panel(pref * E, 3.0, f"layer {layer} preferred", labels))
    caption = "rows: sigma (noise level); columns: experts; colour: share x E (uniform = 1, bright >= 3)"
    image = _stack([_row(load_row), _row(pref_row), _colorbar(3.0)], caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _colorbar(vmax: float, width: int = 200) -> Image.Image:
    bar = Image.new("RGB", (width + 60, 26), "white")
    strip = np.repeat(ramp(np.linspace(0, 1, width))[None], 10, axis=0)
    bar.paste(Image.fromarray(strip), (20, 2))
    draw = ImageDraw.Draw(bar)
    draw.text((20, 13), "0", fill="black")
    draw.text((20 + width - 16, 13), f"{vmax:g}", fill="black")
    return bar


def expert_maps(
    record: RoutingRecord,
    images: list[Image.Image],
    out_dir: str | Path,
    max_images: int = 4,
    timesteps: list[int] | None = None,
    scale: int = 8,
) -> list[Path]:
    """expert_map_layerNN.png per MoE layer: which expert computed each patch, on the first images."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    T = len(record.sigmas)
    ts = timesteps if timesteps is not None else sorted(set(np.linspace(0, T - 1, min(T, 4)).round().astype(int)))
    gh, gw = record.grid
    n_img = min(max_images, len(images), record.logits[0].shape[1])
    palette = np.array(expert_palette(record.num_experts) + [NONE_COLOR], dtype=np.uint8)
    tile_w, tile_h = gw * scale, gh * scale
    paths = []
    for k, layer in enumerate(record.layers):
        assigned = assigned_expert(record.logits[k], record.indices[k])  # (T, N, S)
        head, legend = 14, 16
        sheet = Image.new("RGB", ((len(ts) + 1) * (tile_w + 4), head + n_img * (tile_h + 4) + legend), "white")
        draw = ImageDraw.Draw(sheet)
        draw.text((2, 1), "image", fill="black")
        for c, t in enumerate(ts):
            draw.text(((c + 1) * (tile_w + 4) + 2, 1), f"s={record.sigmas[t]:.2f}", fill="black")
        for n in range(n_img):
            y = head + n * (tile_h + 4)
            sheet.paste(images[n].convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST), (0, y))
            for c, t in enumerate(ts):
                tile = palette[assigned[t, n].reshape(gh, gw)]
                tile = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
                sheet.paste(Image.fromarray(tile), ((c + 1) * (tile_w + 4), y))
        y = head + n_img * (tile_h + 4) + 2
        for e, color in enumerate(palette[:-1]):
            x = 2 + e * 22
            if x + 20 > sheet.width:
                break
            draw.rectangle((x, y, x + 8, y + 8), fill=tuple(int(v) for v in color))
            draw.text((x + 10, y - 1), str(e), fill="black")
        path = out_dir / f"expert_map_layer{layer:02d}.png"
        sheet.save(path)
        paths.append(path)
    return paths
