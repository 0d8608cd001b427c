"""The routing report of `nucleus inspect-routing`: OUT/routing.json (metrics, per-timestep statistics, the first
image's per-expert token sets, the metric definitions) beside the pictures of routing_plots.py. The analysis itself
is routing.py's; this module only writes it down.

    write_report(record, batch, "routing/")
"""

from __future__ import annotations

import json
from pathlib import Path

from .routing import RoutingRecord, SceneBatch, routing_metrics, token_sets
from .routing_plots import expert_load_heatmaps, expert_maps


def write_report(record: RoutingRecord, batch: SceneBatch | None, out, extra: dict | None = None) -> dict:
    """OUT/routing.json (metrics, per-timestep statistics, the first image's per-expert token sets) and the
    pictures: OUT/expert_load.png and OUT/expert_map_layerNN.png. Returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = routing_metrics(record)
    report["definitions"] = METRIC_DEFINITIONS
    report["token_sets_image0"] = {
        str(layer): [token_sets(record.indices[k], t, 0, record.seq_len) for t in range(len(record.sigmas))]
        for k, layer in enumerate(record.layers)
    }
    if batch is not None:
        report["prompts"] = batch.prompts
    report.update(extra or {})
    tmp = out / "routing.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "routing.json")
    expert_load_heatmaps(record, out / "expert_load.png")
    if batch is not None:
        expert_maps(record, batch.images, out)
    return report


METRIC_DEFINITIONS = {
    "router_load": "per timestep, each expert's share of the router's softmax probability mass",
    "preferred_share": "per timestep, share of tokens whose highest-scoring expert is this one",
    "no_expert_share": "share of tokens that no expert picked (only the shared expert saw them)",
    "many_expert_share": "share of tokens picked by more than twice the mean number of experts per token",
    "variance_share": "shares of the expert-centred router-logit sum of squares over the (timestep x token) grid "
    "explained by the timestep main effect, the token main effect and their interaction",
    "jaccard": "mean Jaccard overlap of an expert's chosen token set in one image between two timesteps; "
    "jaccard_chance is the overlap of independent random picks of the same size",
    "nmi": "normalised mutual information I/sqrt(H H) between the token's preferred expert and a label "
    "(timestep; shape, colour, 3x3 region under the token); nmi_assigned uses the expert that computed "
    "the token (best-scoring picker, or none)",
    "homogeneity": "per label (shape, colour, region), mean pairwise cosine similarity between the experts' "
    "distributions of the label under the tokens they picked (background left out for shape and colour); 1 = "
    "every expert sees the same mix, lower = experts specialise",
    "accuracy": "accuracy of predicting a label from the preferred expert by that expert's majority label; "
    "accuracy_chance always guesses the most common label",
}
