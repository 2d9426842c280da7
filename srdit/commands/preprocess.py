"""The `srdit preprocess` command line: an image folder -> ADM center crops -> tokenizer latents -> latent shards.

    srdit preprocess IMAGE_DIR OUT --tokenizer invae --weights e2e-invae-400k.pt [--resolution 256] [--keep-images]
    srdit preprocess IMAGE_DIR OUT ... --part K/N | --ray N
    srdit preprocess --verify OUT [--quick]

What the folder holds, resuming and splitting the work: `srdit.data.preprocess` (one process, any part) and
`srdit.runtime.preprocess_ray` (`--ray N`: N Ray tasks). This command loads the tokenizer and picks between them.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from srdit.commands.errors import ArgError, OneLineParser, fail, first_line
from srdit.data import latents as store
from srdit.data.preprocess import DTYPES, preprocess
from srdit.encoders import load_tokenizer

PROG = "srdit preprocess"


def preprocess_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Image folder -> ADM center crops -> latent shards (resumable).")
    p.add_argument("source", nargs="?", help="ImageNet-style folder: one sub-folder of images per class")
    p.add_argument("out", nargs="?", help="output latent folder (rerun the same command to resume)")
    p.add_argument("--tokenizer", choices=("invae", "sdvae"), default="invae", help="the VAE that encodes the crops")
    p.add_argument("--weights", help="INVAE: e2e-invae-400k.pt (or its folder); SD-VAE: a diffusers folder")
    p.add_argument("--resolution", type=int, default=256, help="crop side in pixels (256 or 512)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per tokenizer call")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image posterior noise")
    p.add_argument("--keep-images", action="store_true", help="also store the uint8 crops (for the DINOv2 teacher)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="storage type of the latents")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--part", default="0/1", help="K/N: only shards K, K+N, ... (one process per device)")
    p.add_argument(
        "--ray",
        type=int,
        metavar="N",
        help="split into N parts run as Ray tasks (one GPU each when the "
        "cluster has GPUs; RAY_ADDRESS or a local Ray), then write the index",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--verify", metavar="DIR", help="check an existing latent folder and exit")
    p.add_argument("--quick", action="store_true", help="with --verify: sizes only, no checksums")
    return p


def main(argv: list[str] | None = None) -> int:
    """`srdit preprocess ...`; returns the exit code (2 and one line on stderr for bad input)."""
    try:
        args = preprocess_parser().parse_args(argv)
        if args.verify:
            problems = store.verify(args.verify, checksums=not args.quick)
            if problems:
                for p in problems:
                    print(f"{args.verify}: {p}", file=sys.stderr)
                return 1
            index = store.read_index(args.verify)
            print(
                f"{args.verify}: ok, {index['num_images']} images in {len(index['shards'])} shards "
                f"({'sizes' if args.quick else 'checksums'} verified)"
            )
            return 0
        if not args.source or not args.out or not args.weights:
            raise ArgError(PROG, "give SOURCE OUT --weights PATH (or --verify DIR)")
        try:
            k, n = (int(v) for v in args.part.split("/"))
        except ValueError:
            raise ArgError(PROG, f"--part {args.part!r}: expected K/N, e.g. 0/8") from None
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        kw = dict(
            resolution=args.resolution,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            seed=args.seed,
            keep_images=args.keep_images,
            dtype=args.dtype,
            workers=args.workers,
            limit=args.limit,
        )
        if args.ray:
            if n != 1:
                raise ArgError(PROG, "--ray N splits the work itself; leave out --part")
            from srdit.runtime.preprocess_ray import preprocess_on_ray

            index = preprocess_on_ray(args.source, args.out, args.tokenizer, args.weights, parts=args.ray, **kw)
        else:
            index = preprocess(
                args.source,
                args.out,
                load_tokenizer(args.tokenizer, args.weights, device),
                part=(k, n),
                progress=False if args.no_progress else None,
                **kw,
            )
        dt = time.perf_counter() - t0
        if index is None:
            print(
                f"{args.out}: part {k}/{n} done in {dt:.0f} s; other parts are still missing (index.json is "
                f"written when every shard is complete)"
            )
        else:
            print(
                f"{args.out}: {index['num_images']} images, {len(index['shards'])} shards, latents "
                f"{index['latent_shape']} ({dt:.0f} s)"
            )
        return 0
    except ArgError as e:
        return fail(e.prog, e.message)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        return fail(PROG, first_line(e))
    except KeyboardInterrupt:
        print("srdit preprocess: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
