"""`nucleus data stats DIR`: counts by stage, reason, tier and bucket of the newest manifest version, and
histogram PNGs (written to DIR/manifest-vNNNN/stats/ unless --png-dir is given).

    nucleus data stats dataset/
    nucleus data stats dataset/manifest-v0002 --png-dir charts/
"""

from __future__ import annotations

from pathlib import Path

from nucleus_image.data.curate.stats import collect_from, format_report, write_charts
from nucleus_image.data.manifest import latest_version_dir


def register(subparsers) -> None:
    p = subparsers.add_parser("stats", help="print counts of a curated manifest and write histogram PNGs")
    p.add_argument("dir", metavar="DIR", help="dataset folder (or a manifest-vNNNN folder)")
    p.add_argument("--png-dir", default=None, help="where to write the charts (default: VERSION/stats)")
    p.set_defaults(func=run)


def run(args) -> int:
    version = latest_version_dir(args.dir)
    print(f"{version}")
    print(format_report(collect_from(args.dir)))
    charts = write_charts(args.dir, Path(args.png_dir) if args.png_dir else version / "stats")
    print("charts: " + ", ".join(str(p) for p in charts))
    return 0
