"""`nucleus data encode-captions`: compute the text states of every caption of a dataset once, into the cache
shared by all training runs (so training processes need not run the text encoder).

    nucleus data encode-captions data/synth [--text-encoder pipeline:DIR] [--cache DIR]
"""

from __future__ import annotations

import time
from pathlib import Path

from nucleus_image.cli.arguments import add_threads_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "encode-captions",
        help="precompute caption text states into the shared cache",
        description="Encode every caption of the dataset's latest manifest (and the empty "
        "prompt) and store the states as safetensors shards under the cache "
        "folder, keyed by (encoder, caption). The stored states are those of "
        "encoding each caption alone (on the CPU, captions of one token length "
        "are encoded together, which gives the same bits). Captions already "
        "stored are skipped.",
    )
    p.add_argument("data", help="dataset folder (with manifest-vNNNN/)")
    p.add_argument(
        "--text-encoder",
        default="minilm",
        help="'minilm' (default) or 'pipeline:DIR' (the text encoder of a pipeline folder), as in training",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder (default $NUCLEUS_CACHE, else $XDG_CACHE_HOME/nucleus, else ~/.cache/nucleus)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nucleus_image.data.text_states import TextStateStore, cache_root, encoder_id
    from nucleus_image.training.data_loader import read_rows

    root = Path(args.cache) if args.cache else cache_root()
    identity = encoder_id(args.text_encoder)  # checks the name before reading any data
    rows = read_rows(Path(args.data))
    captions = {""} | {c for caps in rows.captions for c in caps}
    store = TextStateStore(identity, root=root)
    missing = store.missing(captions)
    encoded = 0
    start = time.perf_counter()
    if missing:
        import torch

        from nucleus_image.training.encoders import from_pipeline_folder

        if args.text_encoder == "minilm":
            from nucleus_image.encoders.minilm import MiniLMTextEncoder

            encoder = MiniLMTextEncoder()
        else:
            encoder = from_pipeline_folder(args.text_encoder, "text_encoder", torch.device("cpu"))
        encoded = store.encode_missing(encoder.eval(), missing, progress=not args.no_progress)
    print(
        f"encoded {encoded} of {len(captions)} captions in {time.perf_counter() - start:.1f}s "
        f"({len(captions) - encoded} were stored); cache {store.folder}"
    )
    return 0
