"""The `srdit` command: train | sample | evaluate | convert | model-info | techniques | study | analyze | report |
ui | preprocess.

Bad input (missing file, malformed YAML, unknown key or technique, impossible combination, foreign checkpoint)
prints one line on stderr and exits with status 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from srdit.config import ConfigError

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"srdit: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_train(args) -> int:
    from srdit.config import to_yaml
    from srdit.techniques import load_run_config
    from srdit.train import JsonlReporter, train

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

    from srdit.parallel import init_from_env

    # Under torchrun (WORLD_SIZE > 1) every process joins one data-parallel run; rank 0 writes and reports.
    cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    dp = init_from_env("cuda" if cuda else "cpu")
    result = train(cfg, out, JsonlReporter(out / "metrics.jsonl"), resume=not args.restart,
                   progress=None if not args.quiet else False)
    if dp.active:
        torch.distributed.destroy_process_group()
    summary = {"status": result.status, "reason": result.reason, "step": result.step, "out": str(out),
               **{k: round(v, 5) for k, v in result.metrics.items() if k in ("fd", "kd", "kd_std", "precision",
                                                                         "recall", "loss", "images_per_s")}}
    if dp.main:
        print(json.dumps(summary))
    return 0 if result.status == "finished" else 1


def _load(ckpt_path: str, device: str):
    """The model and config of a checkpoint, after checking --device (a config rule: train.device's values)."""
    import dataclasses

    from srdit.config import TrainConfig, check_field
    from srdit.train import load_checkpoint, model_from_checkpoint

    check_field(next(f for f in dataclasses.fields(TrainConfig) if f.name == "device"), device, "--device")
    ckpt = load_checkpoint(ckpt_path)
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
    model, cfg = _load(args.checkpoint, args.device)
    cfg = _with_tokenizer(cfg, args)
    sc = with_sampler(cfg, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg)
    dataclasses.replace(cfg, sample=sc).validate()  # e.g. path-drop guidance needs SPRINT
    if _sharded(args):
        return _sample_shard(args, model, cfg, sc)
    from srdit.generate import generate, to_images
    from srdit.imaging import save_samples
    from srdit.train import resolve_device

    device = resolve_device(args.device)
    samples, labels, nfe = generate(model.to(device), cfg, args.n, args.seed, device, args.batch_size, sample_cfg=sc)
    images = to_images(samples, cfg, device, batch_size=args.batch_size)  # decoded as the shards would be
    png, npz = save_samples(images, labels, args.out, scale=max(1, 32 // images.shape[-1]))
    print(json.dumps({"png": str(png), "npz": str(npz), "n": args.n, "nfe": nfe, "sampler": sc.sampler}))
    return 0


def _sample_shard(args, model, cfg, sc) -> int:
    from srdit.sample_shards import merge, resolve_shard, shard_device, write_shard

    shard, num_shards = resolve_shard(args.shard, args.num_shards)
    if args.merge and args.num_shards is None and num_shards > 1:
        return _fail("--merge under torchrun would race the other ranks; run `srdit sample CKPT --n N --out DIR "
                     "--merge` once after every rank has finished")
    device = shard_device(args.device)
    r = write_shard(model.to(device), cfg, args.out, args.n, args.seed, shard, num_shards, device, args.batch_size,
                    sc)
    out = {"shard": str(r.path), "shard_index": r.shard, "num_shards": r.num_shards, "batches": len(r.batches),
           "samples": r.num_samples, "skipped": r.skipped, "n": args.n, "nfe": r.nfe, "sampler": sc.sampler}
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

    from srdit.evaluate import evaluate
    from srdit.generate import with_sampler
    from srdit.train import resolve_device

    import torch

    from srdit.parallel import init_from_env

    model, cfg = _load(args.checkpoint, args.device)
    cfg = _with_tokenizer(cfg, args)
    ev = {"reference": args.reference, "inception_path": args.inception, "dinov2_path": args.dinov2}
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **{k: v for k, v in ev.items() if v}))
    sc = with_sampler(cfg, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg)
    n_eval = dataclasses.replace(cfg.eval, n_samples=args.n) if args.n else cfg.eval  # --n follows eval.n_samples' rule
    dataclasses.replace(cfg, sample=sc, eval=n_eval).validate()
    # Under torchrun every rank samples its shard of the n images into --samples; rank 0 prints the metrics.
    dp = init_from_env("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    device = resolve_device(args.device)
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


def cmd_convert(args) -> int:
    from srdit.convert import convert_file, target_config

    cfg = target_config(args.preset, args.overrides)
    print(json.dumps(convert_file(args.source, args.layout, cfg, args.out, args.weights)))
    return 0


def cmd_model_info(args) -> int:
    from srdit.config import DataConfig, ModelConfig, RunConfig
    from srdit.techniques import preset, with_techniques
    from srdit.model import SIZES, build_model, count_macs

    techniques = [t for t in (args.techniques or "").split(",") if t]
    if args.name in ("SR-DiT-B/1", "digits"):
        cfg = preset(args.name)
    else:
        size, _, patch = args.name.removeprefix("SiT-").removeprefix("DiT-").partition("/")
        if size not in SIZES or patch not in ("1", "2", "4"):
            return _fail(f"unknown model {args.name!r}; allowed: SR-DiT-B/1, digits, or <size>/<patch> with size in "
                         f"{', '.join(SIZES)} and patch 1, 2, 4 (e.g. B/2)")
        native = dict(in_channels=1, input_size=8, num_classes=10) if size == "debug" else \
            dict(in_channels=4, input_size=32, num_classes=1000)  # SD-VAE latent of a 256 px image
        data = DataConfig() if size == "debug" else DataConfig(dataset="latents", path="-")
        cfg = RunConfig(model=ModelConfig(size=size, patch_size=int(patch), **native), data=data)
    if techniques:
        cfg = with_techniques(cfg, techniques)
    model = build_model(cfg.model)
    info = {"params": sum(p.numel() for p in model.parameters()), "params_inference": model.inference_parameters(),
            "gmacs": round(count_macs(model) / 1e9, 4)}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.name}: {info['params'] / 1e6:.2f}M parameters ({info['params_inference'] / 1e6:.2f}M at "
              f"inference), {info['gmacs']:.2f} GMACs per image")
    return 0


def cmd_techniques(args) -> int:
    from srdit.techniques import TECHNIQUES

    if args.json:
        print(json.dumps([{"name": t.name, "description": t.description, "diff": dict(t.diff), "knobs": dict(t.knobs),
                           "paper": t.paper, "code": list(t.code), "stage": t.stage} for t in TECHNIQUES.values()],
                         indent=1))
        return 0
    for t in TECHNIQUES.values():
        print(f"{t.name}: {t.description}")
        print(f"  diff:   {', '.join(f'{k}={json.dumps(v)}' for k, v in t.diff.items())}")
        print(f"  stage:  {'training' if t.stage == 'train' else 'evaluation only (shares the training of its cell)'}")
        if t.knobs:
            print(f"  knobs:  {', '.join(f'{k} -> {v}' for k, v in t.knobs.items())}")
        print(f"  paper:  {t.paper}")
        print(f"  code:   {', '.join(t.code)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srdit", description="Ablation studies for diffusion transformers.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run (default: the embedded digits recipe)")
    t.add_argument("config", nargs="?", help="run YAML (omit for the digits default)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 model.qk_norm=true")
    t.add_argument("--out", default="runs/digits", help="run folder (default: runs/digits)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    for name, func, hlp in [("sample", cmd_sample, ("sample a checkpoint (EMA weights) to a PNG grid and .npz, or to "
                                                         "seed-stable shards for cluster-scale evaluation")),
                            ("evaluate", cmd_evaluate, "sample-quality metrics of a checkpoint: digits FD / KD / "
                                                       "precision / recall; latent runs FID / sFID / IS / P / R")]:
        s = sub.add_parser(name, help=hlp)
        s.add_argument("checkpoint")
        s.add_argument("--n", type=int, default=100 if name == "sample" else None)
        s.add_argument("--sampler", choices=["sde", "euler", "heun"])
        s.add_argument("--steps", type=int)
        s.add_argument("--cfg", type=float, help="classifier-free guidance scale")
        s.add_argument("--device", default="auto")
        if name == "sample":
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--out", required=True, help="folder for samples.png + samples.npz, or for the shards")
            s.add_argument("--batch-size", type=int, help="protocol batch size (default: eval.batch_size); "
                           "samples depend on it, never on the number of shards")
            s.add_argument("--shard", type=int, help="write shard K (of --num-shards) as "
                           "samples_KKKKK-of-WWWWW.npz; default under torchrun: RANK")
            s.add_argument("--num-shards", type=int, help="number of shards (default under torchrun: WORLD_SIZE)")
            s.add_argument("--merge", action="store_true", help="collect the shards in --out into samples_N.npz "
                           "(after writing this process's shard when --shard / --num-shards are given)")
        else:
            s.add_argument("--json", action="store_true")
            s.add_argument("--reference", help="latent runs: reference statistics .npz (overrides eval.reference)")
            s.add_argument("--inception", help="latent runs: FID Inception weights (overrides eval.inception_path)")
            s.add_argument("--dinov2", help="latent runs: local DINOv2 folder for KD_DINOv2 (overrides "
                           "eval.dinov2_path)")
            s.add_argument("--samples", help="latent runs: keep the sample shards here (resumable; default: a "
                           "temporary folder)")
        s.add_argument("--tokenizer", choices=["invae", "sdvae"], help="decode latent samples with this "
                       "tokenizer (overrides data.tokenizer)")
        s.add_argument("--tokenizer-path", help="local weights of the tokenizer (overrides data.tokenizer_path)")
        s.set_defaults(func=func)

    c = sub.add_parser("convert", help="a reference checkpoint (SiT, REPA, SR-DiT) -> an srdit checkpoint")
    c.add_argument("source", help="the reference checkpoint (.pt)")
    c.add_argument("overrides", nargs="*", help="key=value overrides of the preset's config (the srdit model must "
                   "match the checkpoint), e.g. model.size=XL")
    c.add_argument("--from", dest="layout", required=True, help="the reference code's layout: speedrundit, repa, sit")
    c.add_argument("--preset", required=True, help="srdit config to convert into: digits, SR-DiT-B/1, or "
                   "SiT-<size>/<patch> (SD-VAE 256 px latents, e.g. SiT-XL/2)")
    c.add_argument("--weights", default="ema", help="ema or model: which weights of a training checkpoint "
                   "(default: ema; a bare state dict is taken as is)")
    c.add_argument("--out", required=True, help="the srdit checkpoint to write")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("model-info", help="parameters and GMACs of a model (e.g. SR-DiT-B/1, XL/2)")
    m.add_argument("name")
    m.add_argument("--techniques", help="comma-separated techniques to apply")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_model_info)

    tq = sub.add_parser("techniques", help="list the built-in techniques: diff, knobs, paper, code")
    tq.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    tq.set_defaults(func=cmd_techniques)
    for name, hlp in [("study", "plan | run | resume | status | bench a study YAML"), ("analyze", "effects and synergy from a CSV"),
                      ("report", "render a study's dashboard"), ("ui", "start the MLflow UI on the embedded store"),
                      ("preprocess", "image folder -> center crops -> VAE latents in resumable shards"),
                      ("cache-teacher", "a latent folder's alignment-teacher tokens, once, for training to read"),
                      ("reference", "Inception (and DINOv2) reference statistics of real images for eval.reference")]:
        d = sub.add_parser(name, help=hlp, add_help=False)
        d.add_argument("rest", nargs=argparse.REMAINDER)
    return p


DELEGATES = {
    "study": ("srdit.runtime.command", "main"),
    "analyze": ("srdit.analysis.command", "main"),
    "report": ("srdit.report_command", "report_main"),
    "ui": ("srdit.runtime.command", "ui_main"),
    "preprocess": ("srdit.preprocess_command", "main"),
    "cache-teacher": ("srdit.teacher_cache_command", "main"),
    "reference": ("srdit.metrics.reference", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATES:  # these commands own their argument parsing
        import importlib

        module, func = DELEGATES[argv[0]]
        return getattr(importlib.import_module(module), func)(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `srdit convert SRC --from X ... key=value`: overrides after the options
        if args.command != "convert" or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        return args.func(args)
    except ConfigError as e:
        return _fail(str(e))
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print("srdit: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
