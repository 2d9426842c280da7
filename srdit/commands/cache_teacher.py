"""The `srdit cache-teacher` command line: a latent folder's alignment-teacher tokens, computed once.

    srdit cache-teacher LATENTS --teacher dinov2_vitb14 --teacher-path weights/dinov2 --out CACHE [--grid 16]
    srdit cache-teacher ... --part K/N      # one part (one process per GPU; every process writes its own files)
    srdit cache-teacher ... --ray N         # N parts as Ray tasks (RAY_ADDRESS, or a local Ray)

The latent folder must hold the crops (`srdit preprocess --keep-images`). Training reads the result read-only
through `data.teacher_cache: CACHE` (layout and guarantees: `srdit.data.teacher_cache`). Rerunning the same
command skips finished parts.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from srdit.commands.errors import ArgError, OneLineParser, fail, first_line
from srdit.data import teacher_cache as store
from srdit.data.latents import read_index

PROG = "srdit cache-teacher"


def cache_teacher_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Alignment-teacher tokens of a latent folder, once.")
    p.add_argument("data", help="latent folder written by `srdit preprocess --keep-images`")
    p.add_argument("--teacher", default="dinov2_vitb14", help="teacher name (data.teacher)")
    p.add_argument("--teacher-path", default=None, help="local folder of the teacher's weights (data.teacher_path)")
    p.add_argument("--out", required=True, help="cache folder (data.teacher_cache)")
    p.add_argument(
        "--grid",
        type=int,
        default=None,
        help="token grid = model.input_size / model.patch_size (default: the latent side, patch 1)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per teacher call")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--part", default=None, help="K/N: compute only part K of N")
    p.add_argument(
        "--ray", type=int, metavar="N", help="compute the N parts as Ray tasks (one GPU each when the cluster has GPUs)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`srdit cache-teacher ...`; returns the exit code (2 and one line on stderr for bad input)."""
    try:
        args = cache_teacher_parser().parse_args(argv)
        if args.part and args.ray:
            raise ArgError(PROG, "--ray N splits the work itself; leave out --part")
        k, parts = 0, 1
        if args.part:
            try:
                k, parts = (int(v) for v in args.part.split("/"))
                store.part_range(1, parts, k)
            except ValueError:
                raise ArgError(PROG, f"--part {args.part!r}: expected K/N with 0 <= K < N, e.g. 0/8") from None
        if args.ray is not None:
            if args.ray < 1:
                raise ArgError(PROG, f"--ray {args.ray}: expected a positive number of parts")
            parts = args.ray
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        index = read_index(args.data)
        grid = args.grid or int(index["latent_shape"][-1])
        from srdit.encoders import load_teacher

        # The driver writes meta.json first (parts started together would race to create it).
        teacher = load_teacher(args.teacher, args.teacher_path, "cpu" if args.ray else device)
        from srdit.train import teacher_identity

        identity = teacher_identity(args.teacher, args.teacher_path)
        store.create(args.out, store.cache_meta(args.data, identity, grid, teacher.dim, parts))
        t0 = time.perf_counter()
        if args.ray:
            from srdit.runtime.teacher_cache_ray import cache_teacher_on_ray

            del teacher
            done = cache_teacher_on_ray(
                args.data, args.out, args.teacher, args.teacher_path, parts=parts, batch_size=args.batch_size
            )
        else:
            todo = [k] if args.part else range(parts)
            done = sum(store.build_part(args.data, args.out, teacher, j, args.batch_size, device) for j in todo)
        missing = [j for j in range(parts) if not store.part_done(args.out, j, parts)]
        state = "complete" if not missing else f"{len(missing)} of {parts} parts still missing"
        print(f"{args.out}: {done} part(s) computed in {time.perf_counter() - t0:.0f} s; cache {state}")
        return 0
    except ArgError as e:
        return fail(e.prog, e.message)
    except (ValueError, FileNotFoundError, ImportError, OSError, KeyError) as e:
        return fail(PROG, first_line(e))
    except KeyboardInterrupt:
        print("srdit cache-teacher: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
