"""The `srel-fast` command line: it parses flags into a stage's typed config
and calls the stage; nothing else. Flags are generated from the config
dataclasses (``--ipc-start`` sets ``ipc_start``), so the CLI and the Python
API cannot drift apart. A flag left out stays ``None`` in the config, so the
stage takes the value of ``--recipe`` (srel_fast.recipes) for it; ``--help``
lists each stage's flags in groups: the algorithm (recipe values), speed
switches, and the run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from .distributed import is_main
from .errors import UserError
from .recipes import DEFAULT_RECIPE, RECIPES, recipe_help

HELP = {
    # shared
    "out": "output path", "seed": "random seed: the same seed gives the same result",
    "device": "auto, cpu, cuda or cuda:N", "overwrite": "replace an existing output of another run",
    "progress": "show progress bars",
    "arch": "model name (our names or any torchvision classification model); squeeze/train: by image size when "
            "left out (convnet3 < 64 px, resnet18-small < 128 px, else resnet18)",
    "backend": "kernel backend (srel_fast.kernels): auto, torch (plain PyTorch), triton, cuda, cpu",
    "loader": "ImageFolder loader: auto, dali or torch", "num_workers": "data loader workers",
    "width": "ConvNet width", "epochs": "training epochs",
    # squeeze
    "data": "a built-in data set name (fashion-mnist, digits) or an ImageFolder directory (recover: the real "
            "training images for --init real and --r-class; default: the data the checkpoint was trained on)",
    "min_scale": "RandomResizedCrop minimum area fraction", "max_scale": "RandomResizedCrop maximum area fraction",
    "image_size": "input resolution (squeeze: ImageFolder data, inferred from the images when left out; "
                  "elsewhere: weights that carry none)",
    # recover
    "weights": "squeeze checkpoint or torchvision state dict; 'random' for an untrained model",
    "ipc": "images per class", "ipc_start": "first ipc index this run recovers",
    "ipc_end": "one past the last ipc index this run recovers (default: ipc)",
    "iterations": "optimisation steps per batch", "batch_size": "batch size (recover: classes per batch)",
    "lr": "learning rate", "r_bn": "weight of the BN statistics term",
    "first_bn_multiplier": "extra weight of the first BN layer", "jitter": "random roll range in pixels",
    "crop_mode": "batch: one crop per batch (paper); image: one crop per image",
    "image_format": "png (lossless) or jpg", "on_nonfinite": "stop, or skip a diverging batch and go on",
    "num_classes": "class count for --arch without a checkpoint",
    "init": "start images: noise (N(0,1), the paper) or real (a real training image of the class)",
    "r_class": "weight of the class-aware BN term: each class's statistics matched to its real images' (0: off)",
    "class_images": "class-aware: images of a class recovered and matched together",
    "init_select": "init real: random, confident (the teacher's most confident first), band (the same order "
                   "from the first quartile on) or herding (iCaRL)",
    "tiles_per_side": "store k x k images of a class, each at 1/k of the size, in one image (IDC's "
                      "multi-formation; 1: off); training decodes them back to k*k full-size images",
    "tiled_images": "with --tiles-per-side k > 1: how many stored images per class hold tiles (the first ones); "
                    "the others are whole images",
    "tile_iterations": "iterations of the stored images that hold tiles (--iterations: of the whole ones)",
    "crop_curriculum": "none, or cda: the crops' lower scale bound eases from max to min scale (CDA)",
    "augment": "built-in data: rrc (RandomResizedCrop + flip) or shift (pad, random crop, flip)",
    "ema": "evaluate an exponential moving average of the student's weights with this decay (0: off)",
    "seeds": "comma-separated seeds: one student per seed, mean and std in train_results.json",
    # relabel / train
    "syn": "synthetic image directory (recover --out)", "teacher": "teacher checkpoint for soft labels",
    "teacher_arch": "arch of a plain-state-dict teacher", "labels": "stored soft labels (relabel --out)",
    "val": "real validation data: built-in name or ImageFolder directory", "label_mode": "soft or hard labels",
    "temperature": "soft-label temperature T", "topk": "keep only the top-k teacher logits per crop",
    "cutmix": "probability of CutMix per batch", "optimizer": "sgd, adamw or adam",
    "weight_decay": "weight decay", "momentum": "SGD momentum",
    # recipes
    "recipe": f"named defaults for every algorithm flag left out: {', '.join(RECIPES)} "
              f"(default {DEFAULT_RECIPE}; 'srel-fast recipes' lists their values)",
    "lr_step": "when the cosine lr advances: every iteration or every epoch (the official scripts)",
    "warmup_epochs": "epochs of linear lr warm-up before the cosine",
    "warmup_start_factor": "lr factor at the start of the warm-up",
    "normalization": "mean/std: imagenet, tiny-imagenet (squeeze also: dataset, auto = the data's own, ImageNet's "
                     "for ImageNet-sized images); for weights that carry none",
    "val_resize": "validation images: resize-crop (shorter side size/0.875, centre crop) or none (raw images)",
    "jitter_range": "roll drawn from nonnegative: 0..jitter (official ImageNet) or symmetric: -jitter..jitter (official Tiny)",
    "class_layout": "classes of a batch: consecutive (0..B-1, B..2B-1, ...: the paper) or round-robin",
    "jpeg_quality": "JPEG quality (75: PIL's default, the official code's)",
    "pixel_rounding": "[0,1] to uint8: round, or truncate (the official astype(uint8))",
    "decay_bn_bias": "weight decay on BN parameters and biases too (off: the official ImageNet student)",
    "grad_accumulation": "micro-batches per optimiser step; BatchNorm sees batch-size / this",
    "kd_t2": "multiply the KL loss by T^2 (the official Tiny-ImageNet student)",
    "bn_matching": "the BN statistics term: fused (the fused BN kernels) or hooks (the original code's forward "
                   "hooks, the reference)",
    "amp": "autocast of the model: none, bf16 or fp16 (BN statistics stay fp32)",
    "channels_last": "channels-last memory layout", "compile": "torch.compile the loss",
    "cuda_graphs": "with --compile on CUDA: replay the step as CUDA graphs",
    "group_batches": "recovery batches stacked into one launch (BN statistics stay per batch)",
    "check_every": "iterations between loss checks (each syncs the device)",
    "name": "show only this recipe",
}

GROUP_TITLES = {
    "algorithm": ("algorithm", "what is computed; a flag left out takes the value of --recipe"),
    "speed": ("speed switches", "how it is computed: the result stays equal to the reference path's within "
                                "the tested tolerance (bf16/fp16 --amp: within the AMP tolerance)"),
    "run": ("run", "paths, device, resuming, progress"),
}


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def flag_group(cls, name: str) -> str:
    """algorithm (recipe fields and other algorithm flags), speed (speed switches) or run."""
    if name == "recipe" or name in getattr(cls, "RECIPE_FIELDS", ()) or name in getattr(cls, "ALGORITHM_FLAGS", ()):
        return "algorithm"
    if name in getattr(cls, "SPEED_SWITCHES", ()):
        return "speed"
    return "run"


def add_config_args(parser: argparse.ArgumentParser, cls, stage: str | None = None) -> None:
    hints = typing.get_type_hints(cls)
    groups = {}
    if getattr(cls, "RECIPE_FIELDS", ()):
        for key in ("algorithm", "speed", "run"):
            if key == "speed" and not getattr(cls, "SPEED_SWITCHES", ()):
                continue
            groups[key] = parser.add_argument_group(*GROUP_TITLES[key])
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        helptext = HELP.get(f.name, f.name.replace("_", " "))
        if f.name in getattr(cls, "RECIPE_FIELDS", ()):
            shown = f" (default: the recipe's: {recipe_help(stage, f.name)})"
        elif required or f.name == "recipe":
            shown = ""
        else:
            shown = f" (default: {default})"
        where = groups.get(flag_group(cls, f.name), parser)
        if tp is bool:
            where.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext + shown)
        else:
            where.add_argument(flag, type=tp, required=required, default=default, dest=f.name,
                               help=helptext + shown)


def config_from_args(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def _stages():
    from .continual import ContinualConfig, run_continual
    from .demo import DemoConfig, run_demo
    from .pictures import PicturesConfig, run_pictures
    from .recipes import RecipesConfig, run_recipes
    from .recover import RecoverConfig, run_recover
    from .relabel import RelabelConfig, run_relabel
    from .report import ReportConfig, run_report
    from .squeeze import SqueezeConfig, run_squeeze
    from .train import TrainConfig, run_train

    return {
        "squeeze": (SqueezeConfig, run_squeeze, "train (or load) a BatchNorm classifier on the real data"),
        "recover": (RecoverConfig, run_recover, "synthesise images by matching BN statistics"),
        "relabel": (RelabelConfig, run_relabel, "store FKD-style soft labels for every crop"),
        "train": (TrainConfig, run_train, "train a student on the synthetic set and test it on real data"),
        "demo": (DemoConfig, run_demo, "the whole pipeline on Fashion-MNIST, on the CPU"),
        "report": (ReportConfig, run_report, "collect train/demo/continual results into a Markdown table and a plot"),
        "continual": (ContinualConfig, run_continual, "class-incremental learning with a synthetic vs real memory"),
        "pictures": (PicturesConfig, run_pictures, "per-class grid and t-SNE of teacher features of a synthetic set"),
        "recipes": (RecipesConfig, run_recipes, "list the recipes (--recipe) with every value they set"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srel-fast", description="SRe2L dataset condensation: squeeze, recover, relabel.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, helptext) in _stages().items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        add_config_args(p, cls, stage=name)
    b = sub.add_parser("bench", help="benchmarks (srel_fast.bench)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _bench(args: list[str]) -> int:
    from .bench import cli as bench_cli

    return bench_cli.main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        try:
            return _bench(argv[1:])
        except UserError as exc:
            print(f"srel-fast: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser()
    ns = parser.parse_args(argv)
    cls, run, _ = _stages()[ns.command]
    try:
        result = run(config_from_args(cls, ns))
    except UserError as exc:
        print(f"srel-fast: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk or a read-only output: written files are atomic, so nothing is half-written.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"srel-fast: error: cannot write or read a file{where}: {exc.strerror or exc}; "
              "finished work is kept, so run the same command again once this is fixed.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("srel-fast: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    if not isinstance(result, dict):
        return 0
    main_rank = is_main()  # under torchrun, rank 0 alone prints the summary
    if main_rank:
        print(json.dumps({k: v for k, v in result.items() if k != "batches"}, indent=2, default=str))
    failed = result.get("failed_batches")
    if failed:
        if main_rank:
            names = ", ".join(f"(ipc {e['ipc_index']}, batch {e['batch_index']})" for e in failed)
            print(f"srel-fast: {len(failed)} recovery batches failed with a non-finite loss: {names}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
