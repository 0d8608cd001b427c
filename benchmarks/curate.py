"""Curation throughput and near-duplicate search speed.

    python benchmarks/curate.py                       # 240 images of 768x576, 1M hashes
    python benchmarks/curate.py --images 64 --hashes 200000 --subsample 10000   # quick
    python benchmarks/curate.py --images 64 --clip --hashes 0                   # learned stages vs heuristics

1. Local engine: images per second on generated captioned JPEGs, with 1 worker and with every core, printed
   per core and as the multi-core / single-core ratio.
2. Learned stages (--clip): the same images, 1 worker, with a CLIP ViT-B/32-sized model (random weights, same
   compute) scoring aesthetics and caption similarity, against the heuristic stages timed in the same run.
3. Near duplicates among N random 64-bit hashes (plus planted near copies): the multi-index-hashing search
   of `dedup.near_pairs` against brute-force all pairs, timed on a subsample and extrapolated by (N/n)^2,
   printed as a ratio. The index's pairs are checked equal to brute force on the subsample first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test corpus' scene generator

from curate_corpus import GOOD_CAPTION, encode, scene  # noqa: E402
from curate_models import clip_folder  # noqa: E402

from nucleus_image.data.curate import CurateConfig, curate  # noqa: E402
from nucleus_image.data.curate.dedup import all_pairs_near, choose_bands, near_pairs  # noqa: E402
from nucleus_image.data.curate.model_folders import check_folder  # noqa: E402


def write_images(src: Path, n_images: int, size: tuple[int, int]) -> None:
    src.mkdir()
    for i in range(n_images):
        (src / f"img{i:05d}.jpg").write_bytes(encode(scene(1000 + i, size), "JPEG", quality=90))
        (src / f"img{i:05d}.txt").write_text(GOOD_CAPTION.format(c=f"colour {i}"))


def bench_engine(n_images: int, size: tuple[int, int]) -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        write_images(src, n_images, size)
        rates = {}
        for workers in sorted({1, cores}):
            cfg = CurateConfig(workers=workers, chunk_size=max(1, n_images // (4 * workers)))
            start = time.perf_counter()
            result = curate([src], Path(tmp) / f"out{workers}", cfg, progress=False)
            seconds = time.perf_counter() - start
            rates[workers] = n_images / seconds
            print(
                f"local engine, {workers} worker(s): {n_images} images {size[0]}x{size[1]} in {seconds:.2f} s = "
                f"{rates[workers]:.1f} images/s = {rates[workers] / workers:.1f} images/s per core "
                f"(kept {result.kept})"
            )
        if cores > 1:
            print(f"scaling {cores} cores vs 1: {rates[cores] / rates[1]:.2f}x")


def bench_learned_stages(n_images: int, size: tuple[int, int], batch: int) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        src, clip = Path(tmp) / "in", clip_folder(Path(tmp) / "clip-b32", vit_b32=True)
        write_images(src, n_images, size)
        start = time.perf_counter()
        check_folder(clip, "quality.model")
        megabytes = sum(p.stat().st_size for p in clip.iterdir()) / 1e6
        print(
            f"model folder check before the run (headers, processor, head, SHA-256 of {megabytes:.0f} MB): "
            f"{time.perf_counter() - start:.2f} s"
        )
        arms = {
            "heuristic stages": {},
            "CLIP B/32 aesthetic + caption similarity": {
                "quality": {"model": str(clip)},
                "captions": {"model": str(clip)},
                "model_batch_size": batch,
            },
        }
        rates = {}
        for rep in range(2):  # interleaved, the second round reported (the first loads libraries)
            for arm, (name, fields) in enumerate(arms.items()):
                cfg = CurateConfig.from_dict({"preset": "lenient", "workers": 1, "chunk_size": 32, **fields})
                start = time.perf_counter()
                curate([src], Path(tmp) / f"out-{rep}-{arm}", cfg, progress=False)
                rates[name] = n_images / (time.perf_counter() - start)
        threads = torch.get_num_threads()
        for name, rate in rates.items():
            print(f"{name}, 1 worker ({threads} torch threads): {rate:.1f} images/s")
        base = rates["heuristic stages"]
        print(f"learned stages vs heuristic: {rates['CLIP B/32 aesthetic + caption similarity'] / base:.2f}x the rate")


def bench_near_duplicates(n: int, subsample: int, max_dist: int = 4) -> None:
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(
        np.uint64
    )
    planted = min(1000, n // 10)
    flips = rng.integers(0, 64, (planted, 3))
    for k in range(planted):  # near copies at distance <= 3 of the first hashes
        h[n - planted + k] = h[k] ^ np.uint64(sum(1 << int(b) for b in set(flips[k].tolist())))
    sub = h[:subsample]
    assert np.array_equal(near_pairs(sub, max_dist), all_pairs_near(sub, max_dist)), "index disagrees with brute force"

    start = time.perf_counter()
    pairs = near_pairs(h, max_dist)
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    all_pairs_near(sub, max_dist)
    brute_sub_s = time.perf_counter() - start
    brute_s = brute_sub_s * (n / subsample) ** 2
    print(
        f"near duplicates (Hamming <= {max_dist}) among {n} hashes: multi-index hashing "
        f"({choose_bands(n, max_dist)} bands) {index_s:.2f} s, {len(pairs)} pairs (planted {planted})"
    )
    print(f"all pairs: {brute_sub_s:.2f} s on a {subsample} subsample, extrapolated to {n}: {brute_s:.0f} s")
    print(f"speed-up of the index over all pairs: {brute_s / index_s:.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--size", type=int, nargs=2, default=(768, 576))
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--subsample", type=int, default=20_000)
    parser.add_argument("--clip", action="store_true", help="also time the CLIP stages against the heuristics")
    parser.add_argument("--model-batch", type=int, default=16)
    args = parser.parse_args()
    bench_engine(args.images, tuple(args.size))
    if args.clip:
        bench_learned_stages(args.images, tuple(args.size), args.model_batch)
    if args.hashes:
        bench_near_duplicates(args.hashes, min(args.subsample, args.hashes))


if __name__ == "__main__":
    main()
