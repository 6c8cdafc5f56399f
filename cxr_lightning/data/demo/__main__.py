"""``python -m cxr_lightning.data.demo --out DIR``: write a demo dataset from the command line."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cxr_lightning.data import nih
from cxr_lightning.data.demo.write import DEMO_DEFAULTS, generate
from cxr_lightning.errors import CXRError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_lightning.data.demo",
        description="Write a synthetic miniature ChestX-ray14 in the exact NIH layout "
        "(a demo for exercising the pipeline, not evidence about real X-rays).",
    )
    parser.add_argument("--out", required=True, type=Path, help="new or empty directory to write into")
    parser.add_argument("--patients", type=int, default=DEMO_DEFAULTS["patients"])
    parser.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--images-per-folder", type=int, default=DEMO_DEFAULTS["images_per_folder"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = generate(
            args.out, args.patients, args.image_size, args.seed, args.workers,
            images_per_folder=args.images_per_folder,
        )
    except CXRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_images = len((out / nih.LABEL_TABLE).read_text().splitlines()) - 1
    print(f"Wrote {n_images} images of {args.patients} patients to {out} in {time.perf_counter() - start:.1f} s.")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
