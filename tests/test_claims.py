"""`nucleus ablate claims`: the paired interval and the verdict against hand computations, the loss statistics and
expert homogeneity on constructed inputs, clear refusals (unknown claim, arm or key), then a real two-seed run of
the routing claim on a micro dataset (two runs at a time, one thread each) that writes the table, the JSON and
the picture, resumes without training anything, plans only the missing seed, and gathers the document."""

import json
import math

import numpy as np
import pytest
from training_helpers import micro_dataset

from nucleus_image.cli import main
from nucleus_image.eval import claims
from nucleus_image.eval.claims import (
    NONINFERIORITY_MARGIN,
    Arm,
    Claim,
    ClaimsConfig,
    plan_runs,
    select,
    summarize_arm,
    verdict,
)
from nucleus_image.eval.routing import expert_label_shares, homogeneity

T95_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom


def _results(overall: list[float], correct: list[int], losses=None) -> dict[int, dict]:
    return {
        seed: {
            "report": {"overall": o, "tasks": {"counting": {"correct": k, "images": 4}}},
            "losses": losses or [1.0] * 60,
            "routing": None,
        }
        for seed, (o, k) in enumerate(zip(overall, correct))
    }


def test_paired_difference_and_interval_match_a_hand_computation():
    control = _results([0.10, 0.20, 0.15], [1, 2, 1])
    arm = _results([0.05, 0.12, 0.13], [0, 1, 1])
    row = summarize_arm(Arm("x", "x", ("alignment_weight=0",)), arm, control)
    d = np.array([0.05 - 0.10, 0.12 - 0.20, 0.13 - 0.15])  # -0.05, -0.08, -0.02
    assert row["difference"] == pytest.approx(d.mean())
    half = T95_DF2 * math.sqrt(((d - d.mean()) ** 2).sum() / 2) / math.sqrt(3)
    assert row["difference_half"] == pytest.approx(half)  # 0.0745: the interval includes 0
    assert row["verdict"] == "not reproduced at this scale"
    assert row["overall"] == pytest.approx(0.10) and row["tasks"]["counting"]["accuracy"] == pytest.approx(2 / 12)
    # The unpaired spread of each arm is larger than the paired one: seed effects cancel in the differences.
    assert summarize_arm(Arm("c", "c"), control, None)["overall_half"] > half / 2


def test_verdict_rule():
    assert verdict(-0.05, 0.03, "worse") == "reproduced"
    assert verdict(0.05, 0.03, "worse") == "inverted"
    assert verdict(-0.05, 0.06, "worse") == "not reproduced at this scale"
    assert verdict(0.05, 0.03, "better") == "reproduced"
    assert verdict(-0.05, 0.03, "better") == "inverted"
    assert verdict(-0.05, 0.06, "not better") == "reproduced"  # upper end +0.01: within the margin
    assert verdict(0.0, 0.03, "not better") == "not reproduced at this scale"  # could be 3 points better
    assert verdict(0.0, NONINFERIORITY_MARGIN, "not better") == "reproduced"
    assert verdict(0.05, 0.03, "not better") == "inverted"
    assert verdict(0.05, float("nan"), "worse").startswith("not reproduced at this scale (one seed")


def test_final_loss_and_spikes():
    losses = [1.0] * 60 + [2.0] + [1.0] * 39  # one step at twice the running median, inside the last 50
    final, spikes = claims.loss_statistics(losses)
    assert spikes == 1 and final == pytest.approx((49 + 2.0) / 50)
    assert claims.loss_statistics([1.0] * 60 + [1.4] + [1.0] * 39)[1] == 0  # under 1.5x the median: no spike
    assert claims.loss_statistics([1.0] * 100 + [float("nan")])[1] == 1  # a non-finite step counts


def test_expert_homogeneity_is_one_for_identical_mixes_and_zero_for_disjoint_ones():
    labels = np.array([[0, 0, 1, 1, 2, 2]])  # 2 = background, left out
    same = np.array([[[[0, 2], [1, 3]]]])  # T=1, N=1, E=2, C=2: both experts see one of each shape
    apart = np.array([[[[0, 1], [2, 3]]]])
    assert homogeneity(expert_label_shares(same, labels, 3, skip=2)) == pytest.approx(1.0)
    assert homogeneity(expert_label_shares(apart, labels, 3, skip=2)) == pytest.approx(0.0)
    empty_slot = np.array([[[[0, 6], [1, 6]]]])  # index S: a slot no token filled (token choice)
    assert expert_label_shares(empty_slot, labels, 3, skip=2).tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_unknown_claim_arm_and_key_are_refused_by_name(tmp_path, capsys, monkeypatch):
    assert main(["ablate", "claims", "--claim", "routing,speed", "--data", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown claim speed" in err and "accepted: routing, choice, optimizer, capacity, merge" in err
    with pytest.raises(ValueError, match="unknown arm cf_fixed3 .* accepted: cf_fixed2, cf_fixed4, control"):
        select(ClaimsConfig(claims=("capacity",), arms=("cf_fixed3",)))
    fake = Claim("fake", "a key this version lacks", Arm("control", "preset"), (Arm("bad", "bad", ("no_such_key=1",)),))
    monkeypatch.setitem(claims.CLAIMS, "fake", fake)
    assert main(["ablate", "claims", "--claim", "fake", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "claim fake, arm bad (--set no_such_key=1)" in err and "no field 'no_such_key'" in err
    assert not (tmp_path / "o").exists()  # refused before anything ran


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    data = micro_dataset(root / "data")
    args = ["ablate", "claims", "--claim", "routing", "--data", str(data), "--out", str(root / "out")]
    args += ["--seeds", "0,1", "--max-steps", "3", "--per-task", "1", "--samples", "1", "--routing-per-task", "1"]
    args += ["--set", "stages.0.batch_size=4", "--set", "stages.1.batch_size=4", "--parallel", "2"]
    assert main(args) == 0
    return root, data, args


def test_a_real_run_writes_the_claim_and_a_rerun_trains_nothing(finished, capsys):
    root, data, args = finished
    out = root / "out"
    summary = json.loads((out / "routing" / "claim.json").read_text())
    control, coupled = summary["arms"]
    assert (control["arm"], coupled["arm"]) == ("control", "coupled") and coupled["seeds"] == [0, 1]
    assert coupled["overrides"] == ["model.router_input=coupled"]
    reports = {
        (arm, s): json.loads((out / "runs" / arm / f"seed{s}" / "eval" / "report.json").read_text())["overall"]
        for arm in ("control", "coupled")
        for s in (0, 1)
    }
    d = np.array([reports["coupled", s] - reports["control", s] for s in (0, 1)])
    assert coupled["difference"] == pytest.approx(d.mean())
    assert coupled["difference_half"] == pytest.approx(12.706204736 * d.std(ddof=1) / math.sqrt(2))
    assert coupled["verdict"] == verdict(d.mean(), coupled["difference_half"], "worse")
    for row in summary["arms"]:  # three steps logged, routing measured on both arms
        assert math.isfinite(row["final_loss"]) and row["loss_spikes"] == 0
        assert 0 <= row["routing"]["homogeneity_shape"] <= 1 + 1e-9
        assert 0 <= row["routing"]["timestep_variance_share"] <= 1
    config = json.loads((out / "runs" / "coupled" / "seed1" / "run" / "train_config.json").read_text())
    assert config["seed"] == 1 and config["cpu_threads"] == 1 and config["keep_last"] == 16
    assert config["model"]["router_input"] == "coupled"
    table = (out / "routing" / "claim.md").read_text()
    assert "| coupled | `model.router_input=coupled` | 2 |" in table and "Reproduce: `nucleus ablate claims" in table
    assert (out / "routing" / "claim.png").stat().st_size > 0

    losses = out / "runs" / "control" / "seed0" / "run" / "losses.json"
    before = losses.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "started" not in capsys.readouterr().out  # every run's outputs exist: nothing trains or scores
    assert losses.stat().st_mtime_ns == before

    cfg = ClaimsConfig(
        claims=("routing",),
        seeds=(0, 1, 2),
        max_steps=3,
        overrides=("stages.0.batch_size=4", "stages.1.batch_size=4"),
        per_task=1,
        samples=1,
        routing_per_task=1,
    )
    plan = plan_runs(cfg, select(cfg), data, out)  # a third seed: only its runs are planned
    assert [(arm.name, seed, [c[0] for c in cmds]) for arm, seed, cmds in plan] == [
        ("control", 2, ["train", "merge", "eval", "inspect-routing"]),
        ("coupled", 2, ["train", "merge", "eval", "inspect-routing"]),
    ]
    with pytest.raises(ValueError, match="trained with other settings"):
        plan_runs(ClaimsConfig(claims=("routing",), seeds=(0,), max_steps=5), select(cfg), data, out)


def test_write_doc_gathers_the_claims(finished, tmp_path):
    root, _, _ = finished
    doc = tmp_path / "docs" / "claims.md"
    assert main(["ablate", "claims", "--out", str(root / "out"), "--write-doc", str(doc)]) == 0
    text = doc.read_text()
    assert "## routing" in text and "| coupled |" in text and "nucleus ablate claims --claim routing" in text
    assert (tmp_path / "docs" / "claims-routing.png").exists()
    other = tmp_path / "docs" / "claims-full.md"  # a second document's pictures do not overwrite the first's
    assert main(["ablate", "claims", "--out", str(root / "out"), "--write-doc", str(other)]) == 0
    assert "![routing](claims-full-routing.png)" in other.read_text()
    assert (tmp_path / "docs" / "claims-full-routing.png").exists()


def test_one_claims_run_per_out_folder(tmp_path, capsys):
    """A second `nucleus ablate claims` on the same OUT is refused while the first lives; a stale lock (its
    process gone) is taken over and the lock is removed on the way out."""
    import os
    import subprocess
    import sys

    from nucleus_image.eval.claims.runs import LOCK_FILE, run_lock

    out, data = tmp_path / "out", tmp_path / "data"
    out.mkdir()
    data.mkdir()
    (out / LOCK_FILE).write_text(f"{os.getpid()}\n")  # this test's own process: alive
    args = ["ablate", "claims", "--claim", "routing", "--data", str(data), "--out", str(out)]
    assert main(args) == 2
    assert f"another nucleus ablate claims (pid {os.getpid()}) is running" in capsys.readouterr().err
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(gone.stdout)
    with run_lock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (out / LOCK_FILE).exists()
