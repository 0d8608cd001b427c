"""Routing analysis: what the MoE routers decide across the denoising trajectory, and metrics that tell
timestep-driven routing (the collapse the announcement describes for routers fed the modulated token) from
content-driven routing (what decoupled routing is for).

    nucleus inspect-routing --model runs/tiny/merged --out routing/          # JSON report + PNG pictures

Collection (`collect_routing`): the same clean images, captions and noise are pushed through the model at every
sigma of a grid with `return_routing=True` (the model's own option; nothing is computed when it is off), so
each (layer, timestep, image, token) has its router logits and each (layer, timestep, image, expert) its chosen
tokens. On the synthetic domain every token also has exact ground truth (`scene_token_labels`): which shape,
colour and image region lies under it, from the scene's own shape masks.

Statistics, per MoE layer and timestep (`load_statistics`):
- `router_load`: each expert's share of the router's probability mass (with expert choice every expert takes
  exactly C tokens, so imbalance shows in the router's preferences, not in the counts).
- `preferred_share`: share of tokens whose highest-scoring expert is e (token-choice view of the same router).
- `no_expert_share`: share of tokens that no expert picked (only the shared expert computes on them).
- `many_expert_share`: share of tokens picked by more than twice the mean number of experts per token
  (E*C/S); `experts_per_token` is that mean and `max_experts_per_token` the largest count.
- the per-expert token sets themselves (`token_sets`; the report lists them for the first image).

Metrics that separate the regimes (`routing_metrics`), each per MoE layer and averaged over layers:
- `variance_share`: a two-way decomposition of the router logits over the (timestep x token) grid. Logits are
  first centred over experts per token (a shift shared by all experts never changes a routing decision); for
  each expert the total sum of squares splits into a timestep main effect, a token main effect and the
  interaction. `timestep` near 1 means the router mostly reads the timestep; `token` near 1 means content.
- `jaccard`: mean Jaccard overlap |A n B| / |A u B| of the token sets an expert chose in the same image at two
  different timesteps (all pairs), with `jaccard_chance`, the expected overlap of random C-of-S picks. Content
  routing keeps choosing the same tokens as the noise level changes; timestep routing does not.
- `nmi`: normalised mutual information I(X;Y) / sqrt(H(X) H(Y)) between the token's preferred expert (argmax of
  its router scores) and each label: the timestep, and the shape, colour and region under the token (0 =
  independent, 1 = one determines the other). `nmi_assigned` does the same with the expert-choice assignment
  (the highest-scoring expert among those that picked the token, or "none").
- `accuracy` / `accuracy_chance`: how often the majority label of a token's preferred expert is the token's
  own label, against always guessing the most common label: the simple classifier reading of the same question.
- `homogeneity`: per label (shape, colour, region), the mean pairwise cosine similarity between the experts'
  label distributions, each expert's distribution being the share of the tokens it picked (all timesteps and
  images) under each label value; background tokens are left out of the shape and colour distributions. 1 = every
  expert sees the same mix (no specialisation); lower = experts keep to their own shapes, colours or regions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

DEFAULT_SIGMAS = (0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.98)
LABELS = ("timestep", "shape", "color", "region")
REGION_GRID = 3  # regions are the cells of a 3 x 3 split of the image


@dataclass
class RoutingRecord:
    """Router outputs over a (timestep x image x token) grid, as float32/int64 numpy arrays.

    logits[k]: (T, N, S, E) for the k-th MoE layer (model block `layers[k]`); indices[k]: (T, N, E, C) token ids
    each expert chose (with token choice, S marks a slot no token filled; the statistics below skip it). `labels[name]`: (N, S) integer codes into `label_names[name]` (ground truth per token)."""

    sigmas: np.ndarray
    layers: list[int]
    grid: tuple[int, int]
    logits: list[np.ndarray]
    indices: list[np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    label_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.logits[0].shape[-1]

    @property
    def seq_len(self) -> int:
        return self.logits[0].shape[2]


# ---- collection --------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_routing(
    model,
    x0_NSC: torch.Tensor,
    text_NLD: torch.Tensor,
    text_mask_NL: torch.Tensor | None,
    grid: tuple[int, int],
    sigmas=DEFAULT_SIGMAS,
    seed: int = 0,
    batch_size: int = 16,
) -> RoutingRecord:
    """Run packed clean latents through `model` at every sigma with one fixed noise draw (so only the noise level
    changes between timesteps) and keep the routers' logits and choices."""
    from nucleus_image.training.loss import noisy_latents

    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or np.any((sigmas < 0) | (sigmas > 1)):
        raise ValueError(f"sigmas {sigmas.tolist()} must be at least 2 values in [0, 1]")
    layers = list(model.config.moe_layers)
    if not layers:
        raise ValueError("the model has no MoE layers (moe_enabled is off or dense_moe_strategy is all_dense)")
    N, S, _ = x0_NSC.shape
    if grid[0] * grid[1] != S:
        raise ValueError(f"grid {grid} gives {grid[0] * grid[1]} tokens but the latents have {S}")
    device, dtype = model.device, model.dtype
    noise = torch.randn(x0_NSC.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    x0 = x0_NSC.to(device)
    logits = [[] for _ in layers]
    indices = [[] for _ in layers]
    for sigma in sigmas:
        per_t_logits, per_t_idx = [[] for _ in layers], [[] for _ in layers]
        for start in range(0, N, batch_size):
            sl = slice(start, start + batch_size)
            b = x0[sl].shape[0]
            s_B = torch.full((b,), float(sigma), device=device)
            x_t = noisy_latents(x0[sl], noise[sl], s_B).to(dtype)
            mask = None if text_mask_NL is None else text_mask_NL[sl].to(device)
            out = model(
                hidden_states=x_t,
                img_shapes=[(1, *grid)] * b,
                encoder_hidden_states=text_NLD[sl].to(device, dtype),
                encoder_hidden_states_mask=mask,
                timestep=s_B.to(dtype),
                return_routing=True,
            )
            for k, (lg, ix) in enumerate(zip(out.router_logits, out.expert_indices)):
                per_t_logits[k].append(lg.float().cpu())
                per_t_idx[k].append(ix.cpu())
        for k in range(len(layers)):
            logits[k].append(torch.cat(per_t_logits[k]).numpy())
            indices[k].append(torch.cat(per_t_idx[k]).numpy().astype(np.int64))
    return RoutingRecord(sigmas, layers, tuple(grid), [np.stack(v) for v in logits], [np.stack(v) for v in indices])


def scene_token_labels(
    scenes, width: int, height: int, cell: int
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Exact ground truth per token for synthetic scenes rendered at width x height, one token per cell x cell
    pixels: the shape, colour and region (3 x 3 grid) under most of the token's pixels, from the shape masks."""
    from nucleus_image.data.synthetic import COLORS, SHAPES, draw_shape

    if width % cell or height % cell:
        raise ValueError(f"image {width}x{height} is not a whole number of {cell}-pixel tokens")
    gh, gw = height // cell, width // cell
    shapes, colors, regions = [], [], []
    for scene in scenes:
        sx, sy = width / scene.width, height / scene.height  # scenes may be drawn at another size than the tokens
        mask = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(mask)
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.bbox
            draw_shape(draw, obj.shape, (x0 * sx, y0 * sy, x1 * sx, y1 * sy), k + 1)
        ids = np.asarray(mask).reshape(gh, cell, gw, cell).transpose(0, 2, 1, 3).reshape(gh * gw, cell * cell)
        majority = np.array([np.bincount(row, minlength=len(scene.objects) + 1).argmax() for row in ids])
        obj_shape = np.array([len(SHAPES)] + [SHAPES.index(o.shape) for o in scene.objects])
        obj_color = np.array([len(COLORS)] + [list(COLORS).index(o.color) for o in scene.objects])
        shapes.append(obj_shape[majority])
        colors.append(obj_color[majority])
        rows, cols = np.divmod(np.arange(gh * gw), gw)
        regions.append((rows * REGION_GRID // gh) * REGION_GRID + cols * REGION_GRID // gw)
    names = {
        "shape": [*SHAPES, "background"],
        "color": [*COLORS, "background"],
        "region": [f"r{r}c{c}" for r in range(REGION_GRID) for c in range(REGION_GRID)],
    }
    return {"shape": np.stack(shapes), "color": np.stack(colors), "region": np.stack(regions)}, names


@dataclass
class SceneBatch:
    """Clean synthetic renderings of prompts, ready for the model: packed latents, text states, token labels."""

    images: list[Image.Image]
    prompts: list[str]
    x0_NSC: torch.Tensor
    text_NLD: torch.Tensor
    text_mask_NL: torch.Tensor | None
    grid: tuple[int, int]
    labels: dict[str, np.ndarray]
    label_names: dict[str, list[str]]


@torch.no_grad()
def synthetic_scene_batch(pipeline, records: list[dict], seed: int = 0) -> SceneBatch:
    """One ground-truth rendering per GenEval-style record (synthetic classes) at the pipeline's native square
    size, encoded by the pipeline's own autoencoder and text encoder, with exact per-token labels."""
    from nucleus_image.data.synthetic import SynthConfig, render, scene_for_metadata
    from nucleus_image.eval.compositional import validate_records
    from nucleus_image.model.latents import pack_latents

    validate_records(records)
    if pipeline.text_encoder is None:
        raise ValueError("routing inspection needs the pipeline's text encoder to encode the prompts")
    size, cell = pipeline.sample_size, pipeline.granularity
    config = SynthConfig(size=max(size, 32), aspect_ratios=("1:1",))  # the generator's smallest size is 32 px
    scenes, images = [], []
    for index, record in enumerate(records):
        rng = np.random.default_rng([int(seed), index, 11])
        scene = scene_for_metadata(record, rng, config)
        scenes.append(scene)
        image = render(scene, rng)
        images.append(image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BOX))
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    pixels = (pixels / 127.5 - 1.0).to(pipeline.device)
    latents = pipeline.vae.encode(pixels.to(pipeline.vae.dtype)).float()
    patch = pipeline.transformer.config.patch_size
    grid = (latents.shape[2] // patch, latents.shape[3] // patch)
    prompts = [r.get("prompt") or "" for r in records]
    text, mask = pipeline.text_encoder.encode(prompts)
    labels, names = scene_token_labels(scenes, size, size, cell)
    return SceneBatch(images, prompts, pack_latents(latents, patch), text, mask, grid, labels, names)


@torch.no_grad()
def sampled_batch(pipeline, prompts: list[str], seed: int = 0, steps: int = 20) -> SceneBatch:
    """Plain prompts have no ground-truth scene: the model's own samples (prompt i drawn with seed + i at the
    native square size) stand in as the clean images. Without scenes there are no shape or colour labels, so only
    the timestep and token metrics apply."""
    from nucleus_image.model.latents import pack_latents

    if pipeline.text_encoder is None:
        raise ValueError("routing inspection needs the pipeline's text encoder to encode the prompts")
    size = pipeline.sample_size
    images = pipeline(
        prompts,
        height=size,
        width=size,
        num_inference_steps=steps,
        progress=False,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))],
    ).images
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    latents = pipeline.vae.encode((pixels / 127.5 - 1.0).to(pipeline.device, pipeline.vae.dtype)).float()
    patch = pipeline.transformer.config.patch_size
    grid = (latents.shape[2] // patch, latents.shape[3] // patch)
    text, mask = pipeline.text_encoder.encode(prompts)
    return SceneBatch(images, prompts, pack_latents(latents, patch), text, mask, grid, {}, {})


def has_scenes(records: list[dict]) -> bool:
    """Whether every record carries GenEval metadata (a tag and objects) that a synthetic scene can be drawn from."""
    return all("tag" in r and "include" in r for r in records)


def inspect_pipeline(
    pipeline, records: list[dict], sigmas=DEFAULT_SIGMAS, seed: int = 0, batch_size: int = 16, steps: int = 20
) -> tuple[RoutingRecord, SceneBatch]:
    """Routing of a pipeline's transformer at every sigma over ground-truth renderings of `records` (labelled by
    shape, colour and region), or, for plain prompts, over the model's own samples (`steps` denoising steps)."""
    if has_scenes(records):
        batch = synthetic_scene_batch(pipeline, records, seed)
    else:
        batch = sampled_batch(pipeline, [r["prompt"] for r in records], seed, steps)
    record = collect_routing(
        pipeline.transformer, batch.x0_NSC, batch.text_NLD, batch.text_mask_NL, batch.grid, sigmas, seed, batch_size
    )
    record.labels, record.label_names = batch.labels, batch.label_names
    return record, batch


# ---- per-layer, per-timestep statistics ---------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def pick_counts(indices_TNEC: np.ndarray, seq_len: int) -> np.ndarray:
    """(T, N, S): how many experts picked each token (empty slots, index S, are counted apart and dropped)."""
    T, N, E, C = indices_TNEC.shape
    counts = np.zeros((T * N, seq_len + 1), dtype=np.int64)
    flat = indices_TNEC.reshape(T * N, E * C)
    np.add.at(counts, (np.repeat(np.arange(T * N), E * C), flat.ravel()), 1)
    return counts[:, :seq_len].reshape(T, N, seq_len)


def picked_mask(indices_TNEC: np.ndarray, seq_len: int) -> np.ndarray:
    """(T, N, S, E) booleans: expert e picked token s (empty slots, index S, mark nothing)."""
    T, N, E, C = indices_TNEC.shape
    mask = np.zeros((T, N, E, seq_len + 1), dtype=bool)
    np.put_along_axis(mask, indices_TNEC, True, axis=-1)
    return mask[..., :seq_len].transpose(0, 1, 3, 2)


def token_sets(indices_TNEC: np.ndarray, t: int, n: int, seq_len: int) -> list[list[int]]:
    """The sorted token ids each expert chose at timestep index t in image n (without empty slots, index S)."""
    return [sorted(int(s) for s in row if s < seq_len) for row in indices_TNEC[t, n]]


def load_statistics(logits_TNSE: np.ndarray, indices_TNEC: np.ndarray) -> list[dict]:
    """Per timestep: router_load, preferred_share, no_expert_share, many_expert_share, experts_per_token,
    max_experts_per_token (definitions in the module docstring)."""
    T, N, S, E = logits_TNSE.shape
    C = indices_TNEC.shape[-1]
    probs = softmax(logits_TNSE)
    preferred = logits_TNSE.argmax(-1)
    counts = pick_counts(indices_TNEC, S)
    many = 2.0 * E * C / S
    out = []
    for t in range(T):
        out.append(
            {
                "router_load": probs[t].mean(axis=(0, 1)).tolist(),
                "preferred_share": (np.bincount(preferred[t].ravel(), minlength=E) / (N * S)).tolist(),
                "no_expert_share": float((counts[t] == 0).mean()),
                "many_expert_share": float((counts[t] > many).mean()),
                "experts_per_token": float(counts[t].mean()),
                "max_experts_per_token": int(counts[t].max()),
            }
        )
    return out


# ---- metrics that separate timestep routing from content routing -------------------------------------------------
def variance_decomposition(logits_TUE: np.ndarray) -> dict[str, float]:
    """Shares of the (expert-centred) router-logit sum of squares over a timestep x token grid explained by the
    timestep main effect, the token main effect and their interaction; they sum to 1."""
    x = logits_TUE.astype(np.float64)
    x = x - x.mean(axis=-1, keepdims=True)  # a shift common to all experts routes nothing
    grand = x.mean(axis=(0, 1), keepdims=True)
    t_eff = x.mean(axis=1, keepdims=True) - grand
    u_eff = x.mean(axis=0, keepdims=True) - grand
    T, U, _ = x.shape
    ss_total = float(((x - grand) ** 2).sum())
    if ss_total <= 1e-20:
        return {"timestep": 0.0, "token": 0.0, "interaction": 0.0}
    ss_t = float(U * (t_eff**2).sum())
    ss_u = float(T * (u_eff**2).sum())
    return {
        "timestep": ss_t / ss_total,
        "token": ss_u / ss_total,
        "interaction": max(0.0, 1.0 - (ss_t + ss_u) / ss_total),
    }


def jaccard_between_timesteps(indices_TNEC: np.ndarray, seq_len: int) -> tuple[np.ndarray, float]:
    """(T, T) mean Jaccard overlap of each expert's chosen token set between two timesteps (same image), and the
    expected overlap of two independent uniform C-of-S picks (C: the mean set size, which is C itself with expert
    choice and may be less with token choice's empty slots)."""
    mask = picked_mask(indices_TNEC, seq_len).astype(np.float32)  # (T, N, S, E); counts stay exact below 2^24
    inter = np.einsum("anse,bnse->abne", mask, mask)
    sizes = mask.sum(axis=2)  # (T, N, E)
    union = sizes[:, None] + sizes[None, :] - inter
    matrix = (inter / np.maximum(union, 1)).mean(axis=(2, 3))
    C = float(sizes.mean())
    expected_inter = C * C / seq_len
    chance = expected_inter / (2 * C - expected_inter) if C < seq_len else 1.0
    return matrix, float(chance)


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(x: np.ndarray, y: np.ndarray) -> float:
    """I(X;Y) / sqrt(H(X) H(Y)) from paired integer codes; 0 when either variable is constant."""
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1)
    hx, hy, hxy = entropy(joint.sum(1)), entropy(joint.sum(0)), entropy(joint.ravel())
    if hx <= 0 or hy <= 0:
        return 0.0
    return float(max(0.0, hx + hy - hxy) / np.sqrt(hx * hy))


def majority_accuracy(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy of predicting y by the majority y of each x value, accuracy of always guessing the commonest y)."""
    x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(joint, (xi, yi), 1)
    return float(joint.max(axis=1).sum() / len(y)), float(joint.sum(0).max() / len(y))


def assigned_expert(logits_TNSE: np.ndarray, indices_TNEC: np.ndarray) -> np.ndarray:
    """(T, N, S): among the experts that picked each token the one with the highest router logit, or E when
    no expert picked it."""
    E = logits_TNSE.shape[-1]
    picked = picked_mask(indices_TNEC, logits_TNSE.shape[2])
    scored = np.where(picked, logits_TNSE, -np.inf)
    best = scored.argmax(-1)
    return np.where(picked.any(-1), best, E)


def expert_label_shares(indices_TNEC: np.ndarray, labels_NS: np.ndarray, classes: int, skip: int | None) -> np.ndarray:
    """(E, classes): per expert, the share of the tokens it picked under each label value (`skip`, e.g. the
    background, left out; a slot index S, a slot no token filled, counts nowhere); an expert that picked none of
    the counted tokens has a row of zeros."""
    T, N, E, C = indices_TNEC.shape
    padded_NS = np.concatenate([labels_NS, np.full((N, 1), classes, labels_NS.dtype)], axis=1)
    picked_NTEC = padded_NS[np.arange(N)[:, None, None, None], indices_TNEC.transpose(1, 0, 2, 3)]
    counts = np.stack([np.bincount(picked_NTEC[:, :, e].ravel(), minlength=classes + 1)[:classes] for e in range(E)])
    counts = counts.astype(np.float64)
    if skip is not None:
        counts[:, skip] = 0
    total = counts.sum(1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def homogeneity(shares_EK: np.ndarray) -> float:
    """Mean pairwise cosine similarity between the experts' label distributions (experts with none left out):
    1 when all experts see the same mix; nan with fewer than two experts to compare."""
    rows = shares_EK[shares_EK.sum(1) > 0]
    if len(rows) < 2:
        return float("nan")
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    sim = unit @ unit.T
    return float(sim[np.triu_indices(len(rows), 1)].mean())


def layer_metrics(record: RoutingRecord, k: int) -> dict:
    logits, indices = record.logits[k], record.indices[k]
    T, N, S, E = logits.shape
    jac, chance = jaccard_between_timesteps(indices, S)
    off = ~np.eye(T, dtype=bool)
    label_arrays = {"timestep": np.broadcast_to(np.arange(T)[:, None, None], (T, N, S))}
    for name, lab in record.labels.items():
        label_arrays[name] = np.broadcast_to(lab[None], (T, N, S))
    preferred, assigned = logits.argmax(-1), assigned_expert(logits, indices)
    nmi, nmi_assigned, acc, acc_chance = {}, {}, {}, {}
    for name, lab in label_arrays.items():
        nmi[name] = normalized_mutual_information(preferred, lab)
        nmi_assigned[name] = normalized_mutual_information(assigned, lab)
        acc[name], acc_chance[name] = majority_accuracy(preferred, lab)
    shares = {}
    for name, lab in record.labels.items():
        names = record.label_names.get(name, [])
        classes = max(len(names), int(lab.max()) + 1)
        skip = names.index("background") if "background" in names else None
        shares[name] = expert_label_shares(indices, lab, classes, skip)
    return {
        "layer": record.layers[k],
        "variance_share": variance_decomposition(logits.reshape(T, N * S, E)),
        "homogeneity": {name: homogeneity(v) for name, v in shares.items()},
        "expert_label_shares": {name: v.round(4).tolist() for name, v in shares.items()},
        "jaccard": float(jac[off].mean()),
        "jaccard_chance": chance,
        "jaccard_matrix": jac.tolist(),
        "nmi": nmi,
        "nmi_assigned": nmi_assigned,
        "accuracy": acc,
        "accuracy_chance": acc_chance,
        "per_timestep": load_statistics(logits, indices),
    }


def routing_metrics(record: RoutingRecord) -> dict:
    """Per-layer metrics and statistics plus `summary`: the scalar metrics averaged over MoE layers."""
    layers = [layer_metrics(record, k) for k in range(len(record.layers))]
    summary = {
        "variance_share": {
            key: float(np.mean([m["variance_share"][key] for m in layers]))
            for key in ("timestep", "token", "interaction")
        },
        "jaccard": float(np.mean([m["jaccard"] for m in layers])),
        "jaccard_chance": float(np.mean([m["jaccard_chance"] for m in layers])),
    }
    for key in ("nmi", "nmi_assigned", "accuracy", "accuracy_chance"):
        summary[key] = {name: float(np.mean([m[key][name] for m in layers])) for name in layers[0][key]}
    summary["homogeneity"] = {
        name: float(np.nanmean([m["homogeneity"][name] for m in layers])) for name in layers[0]["homogeneity"]
    }
    summary["no_expert_share"] = float(np.mean([s["no_expert_share"] for m in layers for s in m["per_timestep"]]))
    return {
        "sigmas": record.sigmas.tolist(),
        "moe_layers": list(record.layers),
        "grid": list(record.grid),
        "num_experts": record.num_experts,
        "tokens": record.seq_len,
        "images": int(record.logits[0].shape[1]),
        "summary": summary,
        "layers": layers,
    }


def format_metrics(metrics: dict) -> str:
    """A short plain-text table of the summary (the full report is JSON)."""
    s = metrics["summary"]
    lines = [
        f"{'layer':<7}{'var_t':>7}{'var_tok':>8}{'var_int':>8}{'jacc':>7}{'chance':>7}"
        f"{'nmi_t':>7}{'nmi_shp':>8}{'nmi_col':>8}{'nmi_reg':>8}{'none':>7}"
    ]
    rows = [
        (
            f"{m['layer']}",
            m["variance_share"],
            m["jaccard"],
            m["jaccard_chance"],
            m["nmi"],
            float(np.mean([p["no_expert_share"] for p in m["per_timestep"]])),
        )
        for m in metrics["layers"]
    ]
    rows.append(("mean", s["variance_share"], s["jaccard"], s["jaccard_chance"], s["nmi"], s["no_expert_share"]))
    for name, v, j, c, nmi, none in rows:
        lines.append(
            f"{name:<7}{v['timestep']:>7.3f}{v['token']:>8.3f}{v['interaction']:>8.3f}{j:>7.3f}{c:>7.3f}"
            f"{nmi['timestep']:>7.3f}{nmi.get('shape', float('nan')):>8.3f}"
            f"{nmi.get('color', float('nan')):>8.3f}{nmi.get('region', float('nan')):>8.3f}{none:>7.3f}"
        )
    if "shape" not in s["nmi"]:
        lines.append(
            "(plain prompts: the shape, colour and region columns need scenes, i.e. GenEval metadata over "
            "the synthetic shapes)"
        )
    return "\n".join(lines + ["", *COLUMNS])


# The legend printed under the table (the module docstring has the full definitions).
COLUMNS = (
    "var_t / var_tok / var_int: share of the router-logit variance explained by the timestep, by the token, and by",
    "  their interaction (var_t near 1: routing reads the noise level; var_tok near 1: routing reads content)",
    "jacc: mean overlap of the tokens an expert picks in one image at two noise levels; chance: the same for",
    "  random picks (jacc well above chance: experts keep their tokens as the noise changes)",
    "nmi_t / nmi_shp / nmi_col / nmi_reg: how much a token's preferred expert tells about the timestep, and the",
    "  shape, colour and 3x3 region under the token (0 = nothing, 1 = determines it)",
    "none: share of image tokens no expert picked (only the shared expert saw them)",
)
