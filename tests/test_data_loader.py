"""The trainer's data at scale: step k's batch is a pure function of (seed, k); R ranks' slices put together are
the 1-process batch; worker processes decode (and read the text states of) exactly what the training process
would; starting at step k (a resume) yields what a run from step 0 yields at k; nothing is cached, so memory does
not grow with steps."""

import numpy as np
import pytest
import torch
from training_helpers import micro_config, micro_dataset

from nucleus_image.data.text_states import CaptionStates, TextStateStore
from nucleus_image.training.data_loader import BatchPlan, rank_loader, rank_rows, read_rows


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    data = micro_dataset(tmp_path_factory.mktemp("loader") / "data")
    return BatchPlan(micro_config(), read_rows(data), granularity=4)


def test_a_step_batch_is_a_function_of_seed_and_step(plan):
    a, b = plan.batch(17), BatchPlan(plan.cfg, plan.rows, plan.granularity).batch(17)
    assert a.bucket == b.bucket and np.array_equal(a.rows, b.rows) and a.captions == b.captions
    assert a.stage == 0 and plan.batch(25).stage == 1 and len(plan.batch(25).rows) == 2
    other = BatchPlan(plan.cfg.override(["seed=1"]), plan.rows, plan.granularity)
    assert any(not np.array_equal(plan.batch(k).rows, other.batch(k).rows) for k in range(5))
    assert len({tuple(plan.batch(k).rows) for k in range(10)}) > 1  # steps differ from one another


def test_rank_slices_put_together_are_the_global_batch(plan):
    whole = list(rank_loader(plan, 0, 1, 0, 6, num_workers=0))
    halves = [list(rank_loader(plan, r, 2, 0, 6, num_workers=0)) for r in range(2)]
    for k in range(6):
        assert halves[0][k]["step"] == halves[1][k]["step"] == k
        assert torch.equal(torch.cat([halves[0][k]["images"], halves[1][k]["images"]]), whole[k]["images"])
        assert halves[0][k]["captions"] + halves[1][k]["captions"] == whole[k]["captions"]
    assert rank_rows(8, 3, 4).tolist() == [6, 7]
    assert rank_rows(8, 1, 2, accum=2).tolist() == [2, 3, 6, 7]  # its share of each micro-batch
    with pytest.raises(ValueError, match="batch_size 4 does not divide over 3 processes"):
        rank_rows(4, 0, 3)


def test_workers_decode_the_same_batches_and_resume_is_the_step(plan, tmp_path):
    # A text-state store with a random state per caption (of its own length): what the workers read and pad.
    store = TextStateStore("loader-test", tmp_path)
    g = torch.Generator().manual_seed(0)
    store.add({c: torch.randn(1 + len(c) % 13, 6, generator=g) for c in sorted(plan.drawable_captions())})
    inline = list(rank_loader(plan, 1, 2, 0, 24, num_workers=0, store=store))
    workers = list(rank_loader(plan, 1, 2, 0, 24, num_workers=2, store=store))
    resumed = list(rank_loader(plan, 1, 2, 13, 24, num_workers=1, store=store))
    assert [b["step"] for b in workers] == list(range(24)) and [b["step"] for b in resumed] == list(range(13, 24))
    for a, b in zip(inline, workers):
        assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"] and same_texts(a, b)
    for a, b in zip(inline[13:], resumed):
        assert torch.equal(a["images"], b["images"]) and a["captions"] == b["captions"] and same_texts(a, b)
    assert inline[0]["images"].dtype == torch.uint8 and inline[0]["images"].shape[0] == 2
    # Each micro-batch's states are those the training thread used to read and pad itself.
    on_thread = CaptionStates(store, torch.device("cpu"))
    for item in rank_loader(plan, 0, 1, 0, 24, num_workers=1, accum=2, store=store):
        per = len(item["captions"]) // 2
        assert len(item["texts"]) == 2
        for m, (states, mask) in enumerate(item["texts"]):
            ref_states, ref_mask = on_thread.batch(item["captions"][m * per : (m + 1) * per])
            assert torch.equal(states, ref_states) and same_mask(mask, ref_mask)
    assert any(mask is not None for item in inline for _, mask in item["texts"])


def same_mask(a, b) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def same_texts(a: dict, b: dict) -> bool:
    return len(a["texts"]) == len(b["texts"]) and all(
        torch.equal(sa, sb) and same_mask(ma, mb) for (sa, ma), (sb, mb) in zip(a["texts"], b["texts"])
    )


def test_drawable_captions_follow_the_caption_weights(plan):
    drawable = plan.drawable_captions()
    assert "" in drawable
    # micro_config weighs the first two granularities only
    assert all(caps[0] in drawable and caps[1] in drawable for caps in plan.rows.captions)
    assert not any(caps[3] in drawable for caps in plan.rows.captions if caps[3] not in caps[:2])


def test_trainer_takes_its_batch_from_the_plan_and_checkpoints_the_position(tmp_path, plan):
    import json

    from nucleus_image.training.trainer import Trainer

    threads = torch.get_num_threads()
    try:
        trainer = Trainer(
            micro_config(checkpoint_every=2),
            plan.rows.paths[0].parent.parent,
            tmp_path / "run",
            max_steps=2,
            progress=False,
        )
        trainer._enter_stage(0)
        latents, texts, item = trainer._batch(4)
        assert item["captions"] == plan.batch(0).captions and latents.shape[0] == 4 and texts[0][0].shape[0] == 4
        trainer.step = 2  # the loader runs ahead of nothing: a fresh trainer resumes at its own step
        trainer._save()
        state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer.json").read_text())
        assert state["sampler"] == {"kind": "batch-plan", "seed": 0, "next_step": 2, "rank": 0, "world_size": 1}
    finally:
        torch.set_num_threads(threads)
