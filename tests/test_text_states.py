"""The text-state cache shared across runs: states stored once per (encoder, caption), read back bitwise; a
second store (another run) finds them without encoding; two processes adding at once leave a consistent index;
`nucleus data encode-captions` fills it so training encodes nothing; a caption's states equal its states encoded
alone whatever else is in the cache; training loads the text encoder only for missing captions and sample prompts
and lets it go once they are stored."""

import json
import multiprocessing
import os

import torch
from training_helpers import micro_config, run_cli

from nucleus_image.data import text_states
from nucleus_image.data.synthetic import SynthConfig, generate_dataset
from nucleus_image.data.text_states import CaptionStates, TextStateStore, encoder_id


class CountingEncoder:
    """The real MiniLM encoder, counting calls."""

    def __init__(self):
        from nucleus_image.encoders.minilm import MiniLMTextEncoder

        self.inner, self.calls = MiniLMTextEncoder().eval(), 0

    def encode_unique(self, prompts):
        self.calls += 1
        return self.inner.encode_unique(prompts)

    def token_lengths(self, prompts):
        return self.inner.token_lengths(prompts)

    @property
    def device(self):
        return self.inner.device


def test_states_are_stored_once_and_read_back_exactly(tmp_path):
    enc = CountingEncoder()
    captions = ["a red circle", "two blue squares left of a green triangle", ""]
    store = TextStateStore("test-encoder", root=tmp_path)
    assert store.encode_missing(enc, captions + ["a red circle"], progress=False) == 3 and enc.calls == 3
    again = TextStateStore("test-encoder", root=tmp_path)  # another run
    assert again.missing(captions) == [] and again.encode_missing(enc, captions, progress=False) == 0
    for c in captions:
        with torch.no_grad():
            alone, mask = enc.inner.encode_unique([c])
        assert torch.equal(again.get(c), alone[0, : int(mask[0].sum())])
    states, mask = CaptionStates(again, torch.device("cpu")).batch(["a red circle", ""])
    assert states.shape[1] % 8 == 0 and mask is not None and mask[1].sum() < mask[0].sum()
    assert TextStateStore("other-encoder", root=tmp_path).missing(captions) == sorted(captions)


def test_equal_length_batches_store_the_states_of_one_at_a_time(tmp_path):
    """Captions of one token length are encoded together on the CPU, and what is stored is bitwise what
    encoding each caption alone gives (no padding differs), including the empty prompt and a lone length."""
    from nucleus_image.data.synthetic import make_example

    enc = CountingEncoder()
    captions = sorted({c for i in range(40) for c in make_example(0, i)[2][:2]}) + [""]
    lengths = enc.token_lengths(captions)
    assert len(set(lengths)) < len(captions) - 10  # many captions share a length: batches of several
    store = TextStateStore("batched", root=tmp_path)
    assert store.encode_missing(enc, captions, progress=False) == len(captions)
    assert enc.calls == len(set(lengths)) < len(captions)
    for c in captions:
        with torch.no_grad():
            alone, mask = enc.inner.encode_unique([c])
        assert torch.equal(store.get(c), alone[0, : int(mask[0].sum())]), c


def _add(root, start):
    store = TextStateStore("shared", root=root)
    for i in range(start, start + 20):
        store.add({f"caption {i}": torch.full((3, 4), float(i))})


def test_concurrent_writers_leave_a_complete_index(tmp_path, monkeypatch):
    procs = [multiprocessing.get_context("fork").Process(target=_add, args=(tmp_path, s)) for s in (0, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    monkeypatch.setattr(text_states, "OPEN_SHARDS", 2)  # file handles stay bounded however many shards are read
    store = TextStateStore("shared", root=tmp_path)
    for i in range(30):
        assert torch.equal(store.get(f"caption {i}"), torch.full((3, 4), float(i)))
    assert len(store._handles) == 2
    lines = (store.folder / "index.jsonl").read_text().splitlines()
    assert len(lines) == 40 and all(json.loads(line)["shard"].startswith("shard-") for line in lines)
    assert not [p for p in os.listdir(store.folder) if p.startswith(".tmp")]


def test_encoder_id_follows_the_encoder_files(tmp_path):
    assert encoder_id("minilm") == encoder_id("minilm")
    folder = tmp_path / "pipe" / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    first = encoder_id(f"pipeline:{tmp_path / 'pipe'}")
    (folder / "model.safetensors").write_bytes(b"y" * 100)
    assert encoder_id(f"pipeline:{tmp_path / 'pipe'}") != first != encoder_id("minilm")


def test_encode_captions_command_fills_the_cache_for_training(tmp_path, capsys):
    data = tmp_path / "data"
    generate_dataset(data, 6, seed=7, config=SynthConfig(size=32), heldout_per_task=1, progress=False)
    env_cache = tmp_path / "cache"
    os.environ["NUCLEUS_CACHE"], previous = str(env_cache), os.environ["NUCLEUS_CACHE"]
    try:
        done = run_cli("data", "encode-captions", str(data))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "encoded" in done.stdout
        store = TextStateStore(encoder_id("minilm"), root=env_cache)
        from nucleus_image.training.data_loader import BatchPlan, read_rows

        assert store.missing(BatchPlan(micro_config(), read_rows(data), 4).drawable_captions()) == []
        from nucleus_image.cli import main

        assert main(["data", "encode-captions", str(data), "--text-encoder", "clip"]) == 2  # in-process, same entry
        assert "unknown text encoder 'clip'" in capsys.readouterr().err
    finally:
        os.environ["NUCLEUS_CACHE"] = previous


def test_training_lets_the_text_encoder_go_once_captions_and_prompts_are_cached(tmp_path, monkeypatch):
    import gc
    import weakref

    import nucleus_image.training.build as build
    from nucleus_image.training.trainer import Trainer

    data = tmp_path / "data"
    generate_dataset(data, 6, seed=7, config=SynthConfig(size=32), heldout_per_task=1, progress=False)
    monkeypatch.setenv("NUCLEUS_CACHE", str(tmp_path / "cache"))
    loaded, real = [], build.build_encoders

    def spy(cfg, device, load_text_encoder=True):
        text_encoder, autoencoder = real(cfg, device, load_text_encoder)
        loaded.append(None if text_encoder is None else weakref.ref(text_encoder))
        return text_encoder, autoencoder

    monkeypatch.setattr(build, "build_encoders", spy)
    cfg = micro_config(sample_prompts='["a prompt no caption has"]', sample_steps=2)
    threads = torch.get_num_threads()
    try:
        first = Trainer(cfg, data, tmp_path / "first", max_steps=1, progress=False)
        gc.collect()
        assert loaded[0] is not None and loaded[0]() is None  # loaded for the missing captions, then let go
        assert "a prompt no caption has" in first.text_states and "" in first.text_states
        first.train()  # the sample grid's prompt states come from the cache
        assert (tmp_path / "first" / "samples" / "step-00000001.png").exists()
        Trainer(cfg, data, tmp_path / "second", max_steps=1, progress=False)
        assert loaded[1] is None  # everything cached: never loaded
    finally:
        torch.set_num_threads(threads)
