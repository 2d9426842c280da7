"""`srdit reference SOURCE OUT.npz --inception WEIGHTS [--dinov2 DIR]`: reference statistics of real images for
the ImageNet metrics (what the file holds: `srdit.metrics.reference`)."""

from __future__ import annotations

import argparse
import time

from srdit.commands.errors import ArgError, OneLineParser, fail, first_line

PROG = "srdit reference"


def reference_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="`srdit reference`: reference statistics of real images for the "
        "ImageNet metrics, from local weights only.",
    )
    p.add_argument("source", help="ImageNet-style image folder, or a latent folder written with --keep-images")
    p.add_argument("out", help="output .npz (set it as eval.reference)")
    p.add_argument("--inception", help="FID Inception weights (default: $SRDIT_INCEPTION_WEIGHTS)")
    p.add_argument("--dinov2", help="local DINOv2 folder: also store ViT-L/14 features for KD_DINOv2")
    p.add_argument("--n", type=int, default=50_000, help="real images (a seeded random subset; default 50000)")
    p.add_argument("--resolution", type=int, default=256, help="crop side for an image folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception call")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    """`srdit reference ...`; returns the exit code (2 and one line on stderr for bad input)."""
    try:
        args = reference_parser().parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message)
    from srdit.metrics.reference import build_reference

    t0 = time.perf_counter()
    try:
        path = build_reference(
            args.source,
            args.out,
            inception=args.inception,
            n=args.n,
            resolution=args.resolution,
            dinov2=args.dinov2,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        return fail(PROG, first_line(e))
    print(f"{path}: reference statistics written ({time.perf_counter() - t0:.0f} s)")
    return 0
