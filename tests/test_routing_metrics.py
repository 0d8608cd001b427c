"""Routing metrics on constructed router outputs whose answer is known (a router that reads only the timestep, one
that reads only the content under the token), then on a real model and through `nucleus inspect-routing`."""

import json

import numpy as np
import pytest
import torch

from nucleus_image.data.synthetic import SHAPES, Scene, SceneObject
from nucleus_image.eval.routing import (
    RoutingRecord,
    assigned_expert,
    collect_routing,
    jaccard_between_timesteps,
    load_statistics,
    majority_accuracy,
    normalized_mutual_information,
    routing_metrics,
    scene_token_labels,
    token_sets,
    variance_decomposition,
)

T, N, S, E, C = 6, 12, 64, 8, 16  # CF 2: each token is picked by two experts on average


def expert_choice(logits_TNSE: np.ndarray, capacity: int) -> np.ndarray:
    """The model's rule: softmax over experts, then each expert keeps its top-`capacity` tokens."""
    z = np.exp(logits_TNSE - logits_TNSE.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    return np.argsort(-probs.transpose(0, 1, 3, 2), axis=-1, kind="stable")[..., :capacity]


def make_record(logits: np.ndarray, shape_labels: np.ndarray) -> RoutingRecord:
    return RoutingRecord(
        np.linspace(0.05, 0.95, T),
        [1, 2],
        (8, 8),
        [logits, logits.copy()],
        [expert_choice(logits, C)] * 2,
        {"shape": shape_labels},
        {"shape": list(SHAPES)},
    )


@pytest.fixture(scope="module")
def shape_labels():
    return np.random.default_rng(1).integers(0, len(SHAPES), size=(N, S))


@pytest.fixture(scope="module")
def timestep_router(shape_labels):
    """Logits = a large per-timestep expert preference (expert t at step t) plus a little noise that is new at
    every (timestep, token): the token's content plays no part."""
    rng = np.random.default_rng(2)
    pref = np.full((T, E), -2.0)
    pref[np.arange(T), np.arange(T)] = 4.0
    logits = pref[:, None, None, :] + 0.05 * rng.standard_normal((T, N, S, E))
    return routing_metrics(make_record(logits.astype(np.float32), shape_labels))


@pytest.fixture(scope="module")
def content_router(shape_labels):
    """Logits = the shape under the token picks its expert (shape k -> expert k) plus token-specific jitter that
    is the same at every timestep: the timestep plays no part."""
    rng = np.random.default_rng(3)
    table = np.full((len(SHAPES), E), -2.0)
    table[np.arange(len(SHAPES)), np.arange(len(SHAPES))] = 4.0
    jitter = 0.3 * rng.standard_normal((N, S, E))
    logits = np.broadcast_to(table[shape_labels] + jitter, (T, N, S, E))
    return routing_metrics(make_record(np.ascontiguousarray(logits, dtype=np.float32), shape_labels))


def test_timestep_router_is_read_as_timestep_routing(timestep_router):
    s = timestep_router["summary"]
    assert s["variance_share"]["timestep"] > 0.99 and s["variance_share"]["token"] < 0.01
    # Fresh noise decides which tokens an expert takes: overlap between timesteps is what chance gives.
    assert abs(s["jaccard"] - s["jaccard_chance"]) < 0.05
    assert s["nmi"]["timestep"] > 0.99 and s["nmi"]["shape"] < 0.02
    assert s["accuracy"]["timestep"] == 1.0 and s["accuracy_chance"]["timestep"] == pytest.approx(1 / T)
    assert s["accuracy"]["shape"] < s["accuracy_chance"]["shape"] + 0.03
    # The preferred-expert heatmap data: at step t nearly every token prefers expert t.
    stats = timestep_router["layers"][0]["per_timestep"]
    assert all(st["preferred_share"][t] > 0.99 for t, st in enumerate(stats))
    assert all(st["router_load"][t] > 0.5 for t, st in enumerate(stats))


def test_content_router_is_read_as_content_routing(content_router):
    s = content_router["summary"]
    assert s["variance_share"]["token"] > 0.99 and s["variance_share"]["timestep"] < 1e-6
    assert s["jaccard"] == pytest.approx(1.0) and s["jaccard_chance"] < 0.2
    assert s["nmi"]["timestep"] < 1e-6 and s["nmi"]["shape"] > 0.95
    assert s["accuracy"]["shape"] > 0.95 and s["accuracy_chance"]["shape"] < 0.3
    assert s["accuracy"]["timestep"] == pytest.approx(1 / T)
    layer = content_router["layers"][1]
    assert layer["layer"] == 2 and np.allclose(layer["jaccard_matrix"], 1.0)


def test_variance_decomposition_of_an_additive_grid_is_exact():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((5, 1, 4)), rng.standard_normal((1, 30, 4))
    a, b = a - a.mean(0), b - b.mean(1)  # main effects of a balanced grid are centred
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)  # and centred over experts
    shares = variance_decomposition(a + b)
    ss_a, ss_b = 30 * (a**2).sum(), 5 * (b**2).sum()
    assert shares["timestep"] == pytest.approx(ss_a / (ss_a + ss_b)) and shares["interaction"] < 1e-9
    # A shift shared by every expert of a token changes no routing decision and no share.
    shifted = variance_decomposition(a + b + rng.standard_normal((5, 30, 1)) * 10)
    assert shifted["timestep"] == pytest.approx(shares["timestep"])
    noise = variance_decomposition(rng.standard_normal((5, 30, 4)))
    assert noise["interaction"] > 0.6
    assert sum(noise.values()) == pytest.approx(1.0)


def test_nmi_accuracy_and_jaccard_chance():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, 20000)
    assert normalized_mutual_information(x, x) == pytest.approx(1.0)
    assert normalized_mutual_information(x, (x + 3) % 6) == pytest.approx(1.0)  # relabelling does not matter
    assert normalized_mutual_information(x, rng.integers(0, 6, 20000)) < 0.01
    assert normalized_mutual_information(x, np.zeros_like(x)) == 0.0
    acc, chance = majority_accuracy(x, x // 2)
    assert acc == 1.0 and chance == pytest.approx(1 / 3, abs=0.02)
    # Independent uniform picks land on the closed-form chance overlap.
    idx = np.stack([np.stack([rng.permutation(S)[:C] for _ in range(E)]) for _ in range(400)])[None]
    idx = np.concatenate(
        [idx, np.stack([np.stack([rng.permutation(S)[:C] for _ in range(E)]) for _ in range(400)])[None]]
    )
    matrix, chance = jaccard_between_timesteps(idx, S)
    assert matrix[0, 0] == 1.0 and matrix[0, 1] == pytest.approx(chance, abs=0.01)


def test_load_statistics_count_unpicked_and_crowded_tokens():
    logits = np.zeros((1, 1, 8, 4), np.float32)
    idx = np.array([[[[0, 1], [0, 1], [0, 1], [0, 2]]]])  # token 0 by all four experts, tokens 3..7 by none
    st = load_statistics(logits, idx)[0]
    assert st["no_expert_share"] == pytest.approx(5 / 8) and st["max_experts_per_token"] == 4
    assert st["experts_per_token"] == pytest.approx(1.0) and st["many_expert_share"] == pytest.approx(2 / 8)
    assert st["router_load"] == pytest.approx([0.25] * 4)
    assert token_sets(idx[None, 0], 0, 0, 8) == [[0, 1], [0, 1], [0, 1], [0, 2]]
    logits[0, 0, :, 2] = 1.0
    a = assigned_expert(logits, idx)
    assert list(a[0, 0, :4]) == [2, 2, 3, 4]  # the best-scoring picker; E stands for "no expert"


def test_scene_labels_follow_the_shape_masks():
    scene = Scene("single_object", 32, 32, "1:1", "white", "plain", (SceneObject("square", "red", "large", 16, 8, 8),))
    labels, names = scene_token_labels([scene], 32, 32, 4)
    shape = labels["shape"].reshape(8, 8)
    assert (shape[:4, :4] == SHAPES.index("square")).all() and (shape[4:, :] == len(SHAPES)).all()
    assert names["color"][labels["color"][0, 0]] == "red" and names["color"][labels["color"][0, 63]] == "background"
    assert labels["region"][0, 0] == 0 and labels["region"][0, 63] == 8
    # Same scene drawn at twice the size maps to the same tokens.
    big = Scene("single_object", 64, 64, "1:1", "white", "plain", (SceneObject("square", "red", "large", 32, 16, 16),))
    assert (scene_token_labels([big], 32, 32, 4)[0]["shape"] == labels["shape"]).all()


def test_real_model_timestep_only_gate_and_collection_matches_forward():
    from nucleus_image.model import NucleusConfig, NucleusTransformer

    torch.manual_seed(0)
    cfg = NucleusConfig.preset("tiny").replace(num_layers=2, capacity_factors=(0.0, 2.0), joint_attention_dim=16)
    model = NucleusTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and p.abs().max() == 0:
                p.normal_(0.0, 0.05)
    x0, text = torch.randn(3, 16, cfg.in_channels), torch.randn(3, 5, 16)
    record = collect_routing(model, x0, text, None, (4, 4), sigmas=(0.1, 0.5, 0.9), seed=1, batch_size=2)
    assert record.layers == [1] and record.logits[0].shape == (3, 3, 16, cfg.num_experts)
    assert record.indices[0].shape == (3, 3, cfg.num_experts, cfg.capacity(1, 16))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(
            hidden_states=0.5 * x0 + 0.5 * noise,
            img_shapes=[(1, 4, 4)] * 3,
            encoder_hidden_states=text,
            timestep=torch.full((3,), 0.5),
            return_routing=True,
        )
    assert np.allclose(record.logits[0][1], out.router_logits[0].numpy(), atol=1e-5)
    assert (record.indices[0][1] == out.expert_indices[0].numpy()).all()
    # Zero the token half of the gate (input = [t_emb | token]): the router now reads the timestep only.
    with torch.no_grad():
        model.transformer_blocks[1].img_mlp.gate.weight[:, cfg.hidden_size :] = 0
    only_t = collect_routing(model, x0, text, None, (4, 4), sigmas=(0.1, 0.5, 0.9))
    shares = routing_metrics(only_t)["summary"]["variance_share"]
    assert shares["timestep"] > 0.999 and shares["token"] < 1e-6


def test_cli_inspect_routing_writes_report_and_pictures(tmp_path, capsys):
    from generation_fixtures import tiny_own_pipeline
    from PIL import Image

    from nucleus_image.cli import main

    model = tmp_path / "pipeline"
    tiny_own_pipeline().save_pretrained(model)
    out = tmp_path / "routing"
    assert (
        main(
            [
                "inspect-routing",
                "--model",
                str(model),
                "--out",
                str(out),
                "--per-task",
                "1",
                "--sigmas",
                "0.1,0.5,0.9",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((out / "routing.json").read_text())
    assert report["moe_layers"] == [1, 2, 3] and report["images"] == 6 and report["grid"] == [8, 8]
    assert len(report["layers"][0]["per_timestep"]) == 3 and len(report["token_sets_image0"]["1"][0]) == 8
    assert set(report["summary"]["nmi"]) == {"timestep", "shape", "color", "region"}
    assert "variance_share" in report["definitions"] and "mean" in capsys.readouterr().out
    for name in ("expert_load.png", "expert_map_layer01.png", "expert_map_layer03.png"):
        assert Image.open(out / name).size[0] > 100
    assert main(["inspect-routing", "--model", str(model), "--out", str(out), "--sigmas", "0.5,1.5"]) == 2


@pytest.mark.heavy
def test_cli_ablate_routing_trains_both_arms_and_writes_the_table(tmp_path):
    """End to end on a micro config: two `nucleus train` subprocesses, merge, sample, score, routing, FID."""
    from training_helpers import micro_config, micro_dataset

    from nucleus_image.cli import main

    data = micro_dataset(tmp_path / "data")
    config = tmp_path / "micro.json"
    micro_config().save_json(config)
    out = tmp_path / "ablate"
    args = [
        "ablate",
        "routing",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(config),
        "--max-steps",
        "4",
        "--per-task",
        "1",
        "--samples",
        "1",
        "--steps",
        "2",
        "--routing-per-task",
        "1",
        "--sigmas",
        "0.2,0.8",
    ]
    assert main(args) == 0
    summary = json.loads((out / "ablation.json").read_text())
    for arm in ("decoupled", "coupled"):
        a = summary["arms"][arm]
        cfg = json.loads((out / arm / "run" / "train_config.json").read_text())
        assert cfg["model"]["router_input"] == arm and cfg["seed"] == 0 and a["steps"] == 4
        assert np.isfinite(a["final_loss"]) and a["fid_vs_heldout"] > 0 and "overall" in a["compositional"]
        assert 0.0 <= a["routing"]["variance_share"]["timestep"] <= 1.0
    # The arms differ only in router_input.
    a, b = (json.loads((out / arm / "run" / "train_config.json").read_text()) for arm in ("decoupled", "coupled"))
    a["model"].pop("router_input"), b["model"].pop("router_input")
    assert a == b
    table = (out / "ablation.md").read_text()
    assert "| final loss |" in table and "| NMI(preferred expert; timestep) |" in table
    for name in ("loss_curves.png", "expert_load_side_by_side.png", "expert_map_side_by_side.png"):
        assert (out / name).stat().st_size > 1000
    # Re-running resumes: neither arm trains again, and the table is rebuilt from the same runs.
    mtime = (out / "decoupled" / "run" / "losses.json").stat().st_mtime
    assert main(args) == 0
    assert (out / "decoupled" / "run" / "losses.json").stat().st_mtime == mtime
