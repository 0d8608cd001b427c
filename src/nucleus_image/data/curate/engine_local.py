"""The local engine: work units across a process pool on this machine's cores.

Processes are spawned (not forked) so a worker never inherits the parent's threads or locks. With one worker,
or one unit, the units run in this process: same function, same result, no start-up cost. As with any spawned
pool, a script calling `curate(...)` with several workers needs the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from nucleus_image.data.curate.analyse import process_chunk
from nucleus_image.data.curate.config import CurateConfig
from nucleus_image.progress import progress as progress_bar


def run_units(work: Path, units: list[int], cfg: CurateConfig, images_dir: Path, progress: bool) -> None:
    workers = min(cfg.workers or os.cpu_count() or 1, len(units))
    bar = progress_bar(total=len(units), desc="curate (local)", unit="unit", disable=not progress)
    if workers <= 1:
        for unit in units:
            process_chunk(str(work), unit, cfg, str(images_dir))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(process_chunk, str(work), unit, cfg, str(images_dir)) for unit in units]
            for future in as_completed(futures):
                future.result()
                bar.update(1)
    bar.close()
