"""`srdit train | sample | evaluate`: one run of the trainer, and the sampler and evaluation of its checkpoint.

Bad input (missing file, malformed YAML, unknown key or technique, impossible combination, foreign checkpoint)
prints one line `srdit <command>: error: ...` on stderr and exits with status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from srdit.commands.errors import EXIT_FAILURE, ArgError, OneLineParser, fail, first_line, os_error_line
from srdit.config import ConfigError

RESUME_HINT = "rerun the same command to resume from the last checkpoint"


def guarded(prog: str, func, args) -> int:
    """`func(args)` with the run commands' bad input (a config rule, a missing file, a foreign checkpoint) turned
    into one line (`fail`, exit 2); a failure of the machine (an OSError such as a full disk, running out of memory)
    into one line too (exit 1), and Ctrl-C into the resume hint (exit 130)."""
    try:
        return func(args)
    except ConfigError as e:
        return fail(prog, str(e))
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError) as e:
        return fail(prog, first_line(e))
    except OSError as e:  # e.g. a full disk; checkpoints are written atomically: the last complete one is kept
        hint = f"; {RESUME_HINT}" if prog == "srdit train" else ""
        return fail(prog, os_error_line(e) + hint, code=EXIT_FAILURE)
    except (MemoryError, RuntimeError) as e:
        from srdit.train import out_of_memory

        # train() raises MemoryError with out_of_memory's line already (with the config's sizes)
        line = first_line(e) if isinstance(e, MemoryError) and str(e) else out_of_memory(e)
        if line is None:
            raise
        return fail(prog, line, code=EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"srdit: interrupted; {RESUME_HINT}", file=sys.stderr)
        return 130


def parse_and_run(parser: argparse.ArgumentParser, func, argv: list[str] | None) -> int:
    """Parse `argv` with `parser` and run `func(args)` under `guarded`; a parser error is one line (exit 2)."""
    try:
        args = parser.parse_args(argv)
    except ArgError as e:
        return fail(e.prog, e.message)
    return guarded(parser.prog, func, args)


def cmd_train(args) -> int:
    from srdit import stop
    from srdit.config import to_yaml
    from srdit.techniques import load_run_config
    from srdit.train import CHECKPOINT, JsonlReporter, train

    overrides = list(args.overrides)
    if args.config and "=" in args.config and not os.path.exists(args.config):  # `srdit train key=value ...`
        args.config, overrides = None, [args.config] + overrides
    cfg = load_run_config(args.config, overrides)
    out = Path(args.out)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from srdit.parallel import check_same_code, init_from_env
    from srdit.train import resolve_device

    if "WORLD_SIZE" not in os.environ:
        resolve_device(cfg.train.device)  # a device this machine lacks: one line now, before anything is built
    # Under torchrun (WORLD_SIZE > 1) every process joins one data-parallel run; rank 0 writes and reports.
    cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    dp = init_from_env("cuda" if cuda else "cpu")
    check_same_code(dp, cfg.ext)  # torchrun: every rank runs the code the run's keys name
    try:
        with stop.on_signals():  # SIGTERM / SIGINT / SIGHUP: a checkpoint at the current step, then exit
            result = train(
                cfg,
                out,
                JsonlReporter(out / "metrics.jsonl"),
                resume=not args.restart,
                progress=None if not args.quiet else False,
            )
    except stop.Interrupted as e:
        if dp.main:
            print(f"srdit train: {e}; rerun the same command to resume", file=sys.stderr)
        return stop.exit_code(e.why)
    except KeyboardInterrupt:  # a second signal, or the grace period over: no checkpoint at this step
        last = out / CHECKPOINT
        if dp.main:
            print(
                "srdit train: interrupted; "
                + (
                    f"rerun the same command to resume from the last checkpoint ({last})"
                    if last.is_file()
                    else "no checkpoint was written yet, so a rerun starts from step 0"
                ),
                file=sys.stderr,
            )
        return stop.exit_code(stop.requested()) if stop.requested() else 130
    except OSError as e:
        if e.filename or not e.errno:
            raise
        raise OSError(e.errno, e.strerror, str(out)) from e  # a plain write (metrics, samples) names no file
    if dp.active:
        torch.distributed.destroy_process_group()
    summary = {
        "status": result.status,
        "reason": result.reason,
        "step": result.step,
        "out": str(out),
        **{
            k: round(v, 5)
            for k, v in result.metrics.items()
            if k in ("fd", "kd", "kd_std", "precision", "recall", "loss", "images_per_s")
        },
    }
    if dp.main:
        print(json.dumps(summary))
    return 0 if result.status == "finished" else 1


def _load(ckpt_path: str, device: str, plugins: list[str] | None = None):
    """The model and config of a checkpoint, after checking --device (a config rule: train.device's values)."""
    import dataclasses

    from srdit.config import TrainConfig, check_field
    from srdit.train import load_checkpoint, model_from_checkpoint

    check_field(next(f for f in dataclasses.fields(TrainConfig) if f.name == "device"), device, "--device")
    ckpt = load_checkpoint(ckpt_path)
    if plugins:
        from srdit.techniques import load_plugins

        load_plugins(plugins, ".", "--plugins")
    try:
        return model_from_checkpoint(ckpt)
    except ConfigError as e:
        raise ConfigError(f"{ckpt_path}: its config: {e}") from None


def _sharded(args) -> bool:
    """Shard mode: asked for explicitly, or running under torchrun (every rank writing one grid would collide)."""
    return args.shard is not None or args.num_shards is not None or args.merge or "WORLD_SIZE" in os.environ


def _with_tokenizer(cfg, args):
    """The checkpoint's config with --tokenizer / --tokenizer-path applied (older checkpoints lack them)."""
    import dataclasses

    changes = {k: v for k, v in (("tokenizer", args.tokenizer), ("tokenizer_path", args.tokenizer_path)) if v}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes)) if changes else cfg


def cmd_sample(args) -> int:
    import dataclasses

    from srdit.generate import with_sampler

    if args.merge and args.shard is None and args.num_shards is None and "WORLD_SIZE" not in os.environ:
        return _merge_only(args)  # needs no model
    model, cfg = _load(args.checkpoint, args.device, args.plugins)
    cfg = _with_tokenizer(cfg, args)
    sc = with_sampler(cfg, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg)
    dataclasses.replace(cfg, sample=sc).validate()  # e.g. path-drop guidance needs SPRINT
    if _sharded(args):
        return _sample_shard(args, model, cfg, sc)
    from srdit.generate import generate, to_images
    from srdit.imaging import save_samples
    from srdit.train import resolve_device

    device = resolve_device(args.device, "--device")
    samples, labels, nfe = generate(model.to(device), cfg, args.n, args.seed, device, args.batch_size, sample_cfg=sc)
    images = to_images(samples, cfg, device, batch_size=args.batch_size)  # decoded as the shards would be
    png, npz = save_samples(images, labels, args.out, scale=max(1, 32 // images.shape[-1]))
    print(json.dumps({"png": str(png), "npz": str(npz), "n": args.n, "nfe": nfe, "sampler": sc.sampler}))
    return 0


def _sample_shard(args, model, cfg, sc) -> int:
    from srdit.sample_shards import merge, resolve_shard, shard_device, write_shard

    shard, num_shards = resolve_shard(args.shard, args.num_shards)
    if args.merge and args.num_shards is None and num_shards > 1:
        return fail(
            "srdit sample",
            "--merge under torchrun would race the other ranks; run `srdit sample CKPT --n N "
            "--out DIR --merge` once after every rank has finished",
        )
    device = shard_device(args.device)
    r = write_shard(model.to(device), cfg, args.out, args.n, args.seed, shard, num_shards, device, args.batch_size, sc)
    out = {
        "shard": str(r.path),
        "shard_index": r.shard,
        "num_shards": r.num_shards,
        "batches": len(r.batches),
        "samples": r.num_samples,
        "skipped": r.skipped,
        "n": args.n,
        "nfe": r.nfe,
        "sampler": sc.sampler,
    }
    if args.merge:
        out["npz"] = str(merge(args.out, args.n))
    print(json.dumps(out))
    return 0


def _merge_only(args) -> int:
    from srdit.sample_shards import merge

    print(json.dumps({"npz": str(merge(args.out, args.n)), "n": args.n}))
    return 0


def cmd_evaluate(args) -> int:
    import dataclasses

    import torch

    from srdit.evaluate import evaluate
    from srdit.generate import with_sampler
    from srdit.parallel import init_from_env
    from srdit.train import resolve_device

    model, cfg = _load(args.checkpoint, args.device, args.plugins)
    cfg = _with_tokenizer(cfg, args)
    ev = {"reference": args.reference, "inception_path": args.inception, "dinov2_path": args.dinov2}
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **{k: v for k, v in ev.items() if v}))
    sc = with_sampler(cfg, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg)
    n_eval = dataclasses.replace(cfg.eval, n_samples=args.n) if args.n else cfg.eval  # --n follows eval.n_samples' rule
    dataclasses.replace(cfg, sample=sc, eval=n_eval).validate()
    # Under torchrun every rank samples its shard of the n images into --samples; rank 0 prints the metrics.
    dp = init_from_env("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    device = resolve_device(args.device, "--device")
    metrics = evaluate(model.to(device), cfg, device, n=args.n, sample_cfg=sc, samples_dir=args.samples)
    if not dp.main:
        return 0
    metrics["n"] = int(metrics["n"])
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:>10}  {v:.5g}" if isinstance(v, float) else f"{k:>10}  {v}")
    return 0


def train_parser() -> argparse.ArgumentParser:
    t = OneLineParser(prog="srdit train")
    t.add_argument("config", nargs="?", help="run YAML (omit for the digits default)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 model.qk_norm=true")
    t.add_argument("--out", default="runs/digits", help="run folder (default: runs/digits)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return t


def _sample_parser(name: str) -> argparse.ArgumentParser:
    """`srdit sample` and `srdit evaluate`: a checkpoint, the sampler, and what each does with the samples."""
    s = OneLineParser(prog=f"srdit {name}")
    s.add_argument("checkpoint", help="an srdit checkpoint (.pt; its EMA weights are sampled)")
    s.add_argument(
        "--n",
        type=int,
        default=100 if name == "sample" else None,
        help="images to sample"
        if name == "sample"
        else "images to sample for the metrics (default: eval.n_samples of the checkpoint's config)",
    )
    s.add_argument(
        "--sampler",
        choices=["sde", "euler", "heun"],
        help="sampler (default: sample.sampler of the checkpoint's config)",
    )
    s.add_argument("--steps", type=int, help="sampling steps (default: sample.steps of the checkpoint's config)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    if name == "sample":
        s.add_argument("--seed", type=int, default=0, help="sampling seed")
        s.add_argument("--out", required=True, help="folder for samples.png + samples.npz, or for the shards")
        s.add_argument(
            "--batch-size",
            type=int,
            help="protocol batch size (default: eval.batch_size); samples depend on it, never on the number of shards",
        )
        s.add_argument(
            "--shard",
            type=int,
            help="write shard K (of --num-shards) as samples_KKKKK-of-WWWWW.npz; default under torchrun: RANK",
        )
        s.add_argument("--num-shards", type=int, help="number of shards (default under torchrun: WORLD_SIZE)")
        s.add_argument(
            "--merge",
            action="store_true",
            help="collect the shards in --out into samples_N.npz "
            "(after writing this process's shard when --shard / --num-shards are given)",
        )
    else:
        s.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
        s.add_argument("--reference", help="latent runs: reference statistics .npz (overrides eval.reference)")
        s.add_argument("--inception", help="latent runs: FID Inception weights (overrides eval.inception_path)")
        s.add_argument("--dinov2", help="latent runs: local DINOv2 folder for KD_DINOv2 (overrides eval.dinov2_path)")
        s.add_argument(
            "--samples", help="latent runs: keep the sample shards here (resumable; default: a temporary folder)"
        )
    s.add_argument(
        "--tokenizer",
        choices=["invae", "sdvae"],
        help="decode latent samples with this tokenizer (overrides data.tokenizer)",
    )
    s.add_argument("--tokenizer-path", help="local weights of the tokenizer (overrides data.tokenizer_path)")
    s.add_argument(
        "--plugins",
        nargs="+",
        metavar="PLUGIN",
        help="plugin techniques the checkpoint was trained with, when not where training loaded them from (a module, "
        "or a .py file / package folder); their code must be the code it was trained with",
    )
    return s


def sample_parser() -> argparse.ArgumentParser:
    return _sample_parser("sample")


def evaluate_parser() -> argparse.ArgumentParser:
    return _sample_parser("evaluate")


def train_main(argv: list[str] | None = None) -> int:
    """`srdit train [RUN.yaml] [key=value ...]`; returns the exit code (1: the run diverged or failed)."""
    return parse_and_run(train_parser(), cmd_train, argv)


def sample_main(argv: list[str] | None = None) -> int:
    """`srdit sample CKPT --out DIR`; returns the exit code."""
    return parse_and_run(sample_parser(), cmd_sample, argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    """`srdit evaluate CKPT`; returns the exit code."""
    return parse_and_run(evaluate_parser(), cmd_evaluate, argv)
