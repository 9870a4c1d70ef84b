"""Recipes: named sets of defaults across the stages.

A recipe gives every stage (squeeze, recover, relabel, train, and the demo)
the values of its algorithm settings. A stage config leaves such a setting
at ``None`` ("not given"); ``resolve_recipe`` fills each ``None`` from the
recipe named by ``config.recipe`` (``srel`` when none is named), so a value
given explicitly, on the command line or in Python, always wins over the
recipe. The resolved config (recipe name and every value) and the list of
what came from the recipe and what overrode it are written into every
output's JSON.

Recipes:

- ``srel`` (the default): srel-fast's own choices. Today these are the
  values srel-fast always had; measured improvements are added here.
- ``sre2l-imagenet``: the official SRe2L code for ImageNet-1K
  (VILA-Lab/SRe2L: recover/data_synthesis.py with recover.sh,
  relabel/generate_soft_label.py with relabel.sh, validate/train_FKD.py with
  train_FKD.sh). There is no squeeze: the paper recovers from torchvision's
  pretrained IMAGENET1K_V1 ResNets.
- ``sre2l-tiny``: the official code for Tiny-ImageNet (SRe2L's
  small_dataset/recover_tiny.py with recover_tiny.sh, and the teacher and
  student scripts of zeyuanyin/tiny-imagenet: train_rn18.sh, train_kd.sh).
  The official student is taught online (teacher in the loop, nothing
  stored); relabel under this recipe stores exactly those labels.

Adding a value: add the field to the stage config with default ``None``,
name it in the config's ``RECIPE_FIELDS``, and give its value in every
recipe that covers the stage (tests/test_recipes.py checks that the paper
recipes set every recipe field, so they never inherit a new default by
accident). Adding a recipe: one more ``Recipe`` in ``RECIPES``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

DEFAULT_RECIPE = "srel"
STAGES = ("squeeze", "recover", "relabel", "train", "demo")
# px: from this size on, srel's rules take the ImageNet-like values (recovery's lr, r_bn and
# jitter; the student's crops); below it, those measured on small images.
SREL_LARGE_IMAGE = 128


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    values: dict[str, dict[str, Any]]                    # stage -> config field -> value
    not_covered: dict[str, str] = field(default_factory=dict)   # stage -> why the recipe has no values for it
    stage_rules: dict[str, dict[str, str]] = field(default_factory=dict)  # fields left to the stage's own rule
    # The official code's fp32 arithmetic unless --amp is given (the paper recipes); else the
    # device's fast path decides (srel_fast.recover.resolve_speed).
    official_arithmetic: bool = False


_SREL_SQUEEZE = dict(
    batch_size=256, optimizer="sgd", momentum=0.9, min_scale=0.08,
    lr_step="iteration", warmup_epochs=0, warmup_start_factor=0.01, normalization="auto",
)   # image_size and val_resize: inferred from the images (stage_rules; srel_fast.inspect_data)
# srel's teacher for the small in-memory data sets (Fashion-MNIST, digits): the classic
# small-image recipe (pad-and-crop shifts, a short cosine schedule) trains a better ConvNet
# teacher there than ImageNet's RandomResizedCrop recipe (docs/results/quality.md). 15 epochs:
# on Fashion-MNIST the width-128 ConvNet reaches 91.82% after 10 and 92.40% after 15 (width 64:
# 91.40 / 92.25); with no other flag its IPC 10 students gained 1.01 points over random real
# images (three seeds; 10 epochs: 0.50 over two). Digits' 2,000-step floor is longer than either.
SREL_SMALL_DATA_SQUEEZE = dict(epochs=15, lr=0.05, weight_decay=5e-4, augment="shift")
SREL_DEFAULT_SQUEEZE = dict(epochs=50, lr=0.2, weight_decay=1e-4, augment="rrc")
_SREL_RECOVER = dict(
    batch_size=100, jitter_range="nonnegative", max_scale=1.0, class_layout="round-robin", image_format="png",
    jpeg_quality=95, pixel_rounding="round", normalization="imagenet", image_size=224, crop_curriculum="none",
    class_images=10, init_select="random",
)
# srel's recovery for small images (< 128 px) whose real training data is known (the
# checkpoint's data set or --data): start from real images of the class and match each
# class's own BN statistics instead of the running ones (measured on Fashion-MNIST and
# digits, docs/results/quality.md). Otherwise SRe2L's objective from noise.
SREL_SMALL_DATA_RECOVER = dict(init="real", r_class=1.0, r_bn=0.0, first_bn_multiplier=1.0, lr=0.03,
                               iterations=100, crop_mode="image", min_scale=0.5, tiles_per_side=1)
# One whole image of a class is recovered longer: 1,000 iterations gave better students than 100 at
# IPC 1 on Fashion-MNIST (nine seeds: 81.76 +- 1.23 against 80.62 +- 1.87, 7 of 9 seeds ahead) and on
# digits (three seeds, +0.37, all ahead), while at IPC 10 they gave worse ones (-0.36, three seeds of
# three; not measured why: perhaps the longer pull toward one class's statistics makes its ten
# images alike) (docs/results/quality.md). At IPC 2 and 5 the two lengths were level (Fashion-MNIST
# -0.04 and -0.20, digits IPC 2 +0.15; three seeds each), so two whole images and more keep 100.
SREL_SMALL_DATA_ONE_WHOLE_ITERATIONS = 1000
# At IPC 1 the one stored image of a class holds 2 x 2 images at half the size (IDC's
# multi-formation) on images of at least SREL_SMALL_DATA_TILES_MIN_SIZE px (14-px tiles): on
# Fashion-MNIST the students gained 1.18 points over one recovered image per class (84.14 against
# 82.96, three seeds, every seed ahead), 3.83 over one random real image. On digits (8 px: 4-px
# tiles) they lost 5.9 points (three seeds). At Fashion-MNIST IPC 2 every stored image in tiles was
# level with whole images (+0.09 / +0.17 over four seeds, recovered 1,000 / 3,000 iterations), and at
# IPC 5 and 10 it lost (-2.43 and -4.19, one seed each): there the tiles' lost detail costs more than
# their number brings. One stored image of tiles beside a whole one (mixed formation) is the best
# measured at IPC 2: 1.10 points over two whole images (six seeds, every seed ahead), 2.42 over random
# real images; at IPC 3 one of tiles beside two whole ones gained 0.92 over three whole ones (five
# seeds, every seed ahead); at IPC 4 it was not clearly ahead (+0.17, six seeds, four ahead, at
# three times the cost); at IPC 5 one of tiles beside four whole ones was 0.24 behind five whole ones
# (three seeds; with the student's crops of 0.5-1, 0.27 ahead over five seeds, four ahead: not clear
# either), at IPC 10 one beside nine 1.14 behind (one seed). The gain is the recovery's: the same
# formation of real images left at its start trains worse students than random real images (IPC 1-3).
# So SREL_SMALL_DATA_TILED_IMAGES stored images per class hold tiles, the others are whole, at IPC up
# to SREL_SMALL_DATA_TILES_MAX_IPC (docs/results/quality.md).
SREL_SMALL_DATA_TILES_MIN_SIZE = 28
SREL_SMALL_DATA_TILES_MAX_IPC = 3
SREL_SMALL_DATA_TILED_IMAGES = 1
# Tiles need a longer recovery than whole images: at Fashion-MNIST IPC 1, 3,000 iterations gave better
# students than 1,000 (seven seeds: +0.29 paired, five of seven ahead; the untiled images lost 0.56 with
# that change), and at IPC 2 with every stored image in tiles 1,000 gave better ones than 100 (+1.0,
# two seeds) (docs/results/quality.md). So stored tiles, by the rule or by --tiles-per-side, get these
# lengths (--tile-iterations), by how many stored images of a class hold them.
SREL_SMALL_DATA_ONE_TILED_ITERATIONS = 3000
SREL_SMALL_DATA_TILES_ITERATIONS = 1000   # two or more stored images of tiles per class
SREL_DEFAULT_RECOVER = dict(init="noise", r_class=0.0, first_bn_multiplier=10.0, iterations=1000,
                            crop_mode="batch", min_scale=0.08, tiles_per_side=1)
# CutMix in every student batch (as the official ImageNet student): on Fashion-MNIST IPC 10 it lifted both the
# synthetic and the random-real students, the synthetic more (docs/results/quality.md).
_SREL_RELABEL = dict(batch_size=100, temperature=20.0, max_scale=1.0, cutmix=1.0,
                     normalization="imagenet", image_size=224)   # epochs, min_scale: by the images (below)
_SREL_TRAIN = dict(
    batch_size=100, optimizer="adamw", lr=1e-3, weight_decay=0.01, momentum=0.9, temperature=20.0,
    max_scale=1.0, cutmix=1.0, lr_step="iteration", warmup_epochs=0, warmup_start_factor=0.01,
    decay_bn_bias=True, grad_accumulation=1, kd_t2=False, normalization="imagenet",
    image_size=224, ema=0.0,
)   # val_resize: by the size of the --val images (stage_rules; srel_fast.inspect_data); epochs,
#    min_scale: by the synthetic images (with_student_rules)
# The student's length under srel (relabel and train alike, so that stored labels cover the
# training): 300 epochs, but at least SREL_STUDENT_MIN_STEPS optimiser steps. A small
# synthetic set makes few steps an epoch (Fashion-MNIST IPC 10: 100 images, one step of
# 100), and there the student is far from done after a few hundred steps: on that set the
# same student reached 87.4 (random real) / 87.8 (distilled) after 2,000 steps against
# 83.2 / 84.9 after 600 (docs/results/quality.md). Large sets are unchanged (ImageNet
# IPC 10: 30,000 steps in 300 epochs).
SREL_STUDENT_EPOCHS = 300
SREL_STUDENT_MIN_STEPS = 2000
SREL_STUDENT_EPOCHS_RULE = (f"{SREL_STUDENT_EPOCHS}, but at least {SREL_STUDENT_MIN_STEPS:,} optimiser steps "
                            "(small synthetic sets)")


def srel_student_epochs(num_images: int, batch_size: int) -> int:
    """srel's epochs for a student on ``num_images`` images in batches of ``batch_size``."""
    steps_per_epoch = -(-num_images // batch_size)
    return max(SREL_STUDENT_EPOCHS, -(-SREL_STUDENT_MIN_STEPS // steps_per_epoch))


# The student's crops under srel (relabel and train alike): RandomResizedCrop's scale from
# SREL_STUDENT_MIN_SCALE_SMALL on images under SREL_LARGE_IMAGE px, from the official ImageNet
# student's 0.08 on larger ones. A crop of 8% of a 28-px image is about 8 x 8 pixels (of a
# 14-px tile, 4 x 4); crops of 0.5-1 trained the better student from the distilled images on
# Fashion-MNIST at IPC 1, 2, 3 and 10 (+0.96, +0.36, +0.34, about +0.4; three seeds each; level
# at IPC 5, one seed) and on digits at IPC 1 and 10 (+0.37, +0.15), and from random real images
# more (docs/results/quality.md, "The student's crops and soft-label temperature").
SREL_STUDENT_MIN_SCALE = 0.08
SREL_STUDENT_MIN_SCALE_SMALL = 0.5
SREL_STUDENT_MIN_SCALE_RULE = (f"{SREL_STUDENT_MIN_SCALE_SMALL} for synthetic images under {SREL_LARGE_IMAGE} px, "
                               f"else {SREL_STUDENT_MIN_SCALE}")


def srel_student_min_scale(height: int, width: int) -> float:
    """srel's lower crop-scale bound for a student on ``height`` x ``width`` images."""
    return SREL_STUDENT_MIN_SCALE_SMALL if min(height, width) < SREL_LARGE_IMAGE else SREL_STUDENT_MIN_SCALE


def with_student_rules(cfg, images_shape, recipe_record: dict | None = None):
    """``cfg`` (a resolved train or relabel config) with the recipe's rules for what depends on
    the synthetic images (``images_shape``: N, C, H, W) applied to the fields left open: the
    epochs (srel_student_epochs) and the crops' lower scale (srel_student_min_scale). Relabel
    and train resolve them alike, so a store made with the defaults covers a student trained
    with the defaults. Recorded under the record's "from_recipe"."""
    num_images, _, height, width = images_shape
    updates = {}
    if cfg.epochs is None:
        updates["epochs"] = srel_student_epochs(num_images, cfg.batch_size)
    if cfg.min_scale is None:
        updates["min_scale"] = srel_student_min_scale(height, width)
    if not updates:
        return cfg
    if recipe_record is not None:
        recipe_record["from_recipe"] = dict(sorted({**recipe_record["from_recipe"], **updates}.items()))
    return dataclasses.replace(cfg, **updates)


# The demo's own settings for Fashion-MNIST under srel (tuned there; see README). Under
# other recipes the demo sets only its budget and the stages take the recipe's values.
# Recovery takes the recover stage's rules (small images with known real data: real start,
# class-aware matching; docs/results/quality.md).
_SREL_DEMO = dict(squeeze_lr=0.05, min_scale=0.5, train_lr=0.01, train_batch_size=50, train_optimizer="adamw",
                  train_weight_decay=0.01)
_SREL_DEMO_RULES = {k: "the recover stage's rule" for k in ("recover_lr", "r_bn", "crop_mode")}

# Recovery in the official code (data_synthesis.py, recover.sh): Adam(0.5, 0.9), cosine without
# warm-up, CE + r_bn * BN term with the first layer x10, one RandomResizedCrop(224) + flip + roll
# for the whole batch, classes 0..99, 100..199, ... per batch, JPEG at PIL's default quality
# after (x * 255).astype(uint8). l2-scale and tv-l2 are 0 in recover.sh, so those terms vanish.
_OFFICIAL_RECOVER = dict(
    iterations=4000, batch_size=100, first_bn_multiplier=10.0, min_scale=0.08, max_scale=1.0, crop_mode="batch",
    class_layout="consecutive", image_format="jpg", jpeg_quality=75, pixel_rounding="truncate",
    init="noise", r_class=0.0, class_images=10, crop_curriculum="none", init_select="random", tiles_per_side=1,
    tiled_images=0, tile_iterations=4000,   # no tiles: tile_iterations is the iterations' value, unused
)

RECIPES: dict[str, Recipe] = {
    "srel": Recipe(
        name="srel",
        summary="srel-fast's own recipe: lossless PNG, classes round-robin over batches, per-iteration "
                "cosine; the values srel-fast always had.",
        values={"squeeze": _SREL_SQUEEZE, "recover": _SREL_RECOVER, "relabel": _SREL_RELABEL,
                "train": _SREL_TRAIN, "demo": _SREL_DEMO},
        stage_rules={"demo": _SREL_DEMO_RULES,
                     "squeeze": {**{k: f"built-in (small, in-memory) data sets: {v}; else {SREL_DEFAULT_SQUEEZE[k]}"
                                    for k, v in SREL_SMALL_DATA_SQUEEZE.items()},
                                 # issue 19: from the ImageFolder's images (srel_fast.inspect_data)
                                 "image_size": "the images' size (one size), else their median shorter side; "
                                               "at most 224",
                                 "val_resize": "none for images of one size <= 64 px, else resize-crop"},
                     "train": {"val_resize": "none for --val images of one size <= 64 px, else resize-crop",
                               "epochs": SREL_STUDENT_EPOCHS_RULE, "min_scale": SREL_STUDENT_MIN_SCALE_RULE},
                     "relabel": {"epochs": SREL_STUDENT_EPOCHS_RULE, "min_scale": SREL_STUDENT_MIN_SCALE_RULE},
                     "recover": {
            "lr": f"0.25 at >= {SREL_LARGE_IMAGE} px; small images with real data: 0.03; else 0.1",
            "r_bn": f"0.01 at >= {SREL_LARGE_IMAGE} px; small images with real data: 0; else 1.0",
            "jitter": f"32 at >= {SREL_LARGE_IMAGE} px, else image size // 16",
            **{k: f"small images (< {SREL_LARGE_IMAGE} px) with real data: {v}; else {SREL_DEFAULT_RECOVER[k]}"
               for k, v in SREL_SMALL_DATA_RECOVER.items()
               if k in SREL_DEFAULT_RECOVER and k not in ("iterations", "tiles_per_side")},
            "tiles_per_side": (f"small images (< {SREL_LARGE_IMAGE} px) with real data: 2 at IPC {SREL_SMALL_DATA_TILES_MAX_IPC} "
                               f"and below for images of an even size of at least {SREL_SMALL_DATA_TILES_MIN_SIZE} "
                               "px, else 1; else 1"),
            "tiled_images": (f"with tiles: small images with real data: {SREL_SMALL_DATA_TILED_IMAGES} (the "
                             "others whole); else every stored image; without tiles: 0"),
            "iterations": (f"small images (< {SREL_LARGE_IMAGE} px) with real data: {SREL_SMALL_DATA_ONE_WHOLE_ITERATIONS} for "
                           f"one whole image per class, else {SREL_SMALL_DATA_RECOVER['iterations']}; else "
                           f"{SREL_DEFAULT_RECOVER['iterations']}; with no whole image, the tile iterations"),
            "tile_iterations": (f"the --iterations given; else small images with real data: "
                                f"{SREL_SMALL_DATA_ONE_TILED_ITERATIONS} for one stored image of tiles per class, "
                                f"else {SREL_SMALL_DATA_TILES_ITERATIONS}; else the iterations")}},
    ),
    "sre2l-imagenet": Recipe(
        name="sre2l-imagenet",
        summary="the official SRe2L code for ImageNet-1K (VILA-Lab/SRe2L recover.sh, relabel.sh, train_FKD.sh).",
        values={
            "recover": dict(_OFFICIAL_RECOVER, lr=0.25, r_bn=0.01, jitter=32, jitter_range="nonnegative",
                            normalization="imagenet", image_size=224),
            # generate_soft_label.py: batch 1024, CutMix (Beta(1, 1)) in every batch, fp16 logits.
            "relabel": dict(epochs=300, batch_size=1024, temperature=20.0, min_scale=0.08, max_scale=1.0,
                            cutmix=1.0, normalization="imagenet", image_size=224),
            # train_FKD.py: AdamW (no decay on BN and bias), cosine stepped per epoch, batch 1024 as two
            # accumulated halves of 512, KL(batchmean) at T 20 without T^2, val Resize(256) + CenterCrop(224).
            "train": dict(epochs=300, batch_size=1024, optimizer="adamw", lr=1e-3, weight_decay=0.01, momentum=0.875,
                          temperature=20.0, min_scale=0.08, max_scale=1.0, cutmix=1.0, lr_step="epoch",
                          warmup_epochs=0, warmup_start_factor=0.01, decay_bn_bias=False, grad_accumulation=2,
                          kd_t2=False, val_resize="resize-crop", normalization="imagenet", image_size=224, ema=0.0),
            "demo": {},
        },
        not_covered={"squeeze": "the paper recovers from torchvision's pretrained IMAGENET1K_V1 weights "
                                "('recover --recipe sre2l-imagenet --arch resnet18 --weights FILE')"},
        official_arithmetic=True,
    ),
    "sre2l-tiny": Recipe(
        name="sre2l-tiny",
        summary="the official code for Tiny-ImageNet (SRe2L recover_tiny.sh; zeyuanyin/tiny-imagenet "
                "train_rn18.sh for the teacher, train_kd.sh for the student, taught online).",
        values={
            # tiny-imagenet classification/train.py: SGD, 5 epochs of linear warm-up from 0.01 then cosine,
            # stepped per epoch, weight decay on every parameter, Tiny mean/std, val on the raw 64 px images.
            "squeeze": dict(epochs=50, batch_size=256, optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4,
                            min_scale=0.08, lr_step="epoch", warmup_epochs=5, warmup_start_factor=0.01,
                            normalization="tiny-imagenet", image_size=64, val_resize="none", augment="rrc"),
            # recover_tiny.py: as ImageNet but 64 px, lr 0.1, r_bn 1, roll by randint(-4, 4).
            "recover": dict(_OFFICIAL_RECOVER, lr=0.1, r_bn=1.0, jitter=4, jitter_range="symmetric",
                            normalization="tiny-imagenet", image_size=64),
            "relabel": dict(epochs=100, batch_size=256, temperature=20.0, min_scale=0.08, max_scale=1.0, cutmix=0.0,
                            normalization="tiny-imagenet", image_size=64),
            # train_kd.py with train_kd.sh: SGD lr 0.2 with the squeeze's schedule, KL * T^2, no CutMix.
            "train": dict(epochs=100, batch_size=256, optimizer="sgd", lr=0.2, weight_decay=1e-4, momentum=0.9,
                          temperature=20.0, min_scale=0.08, max_scale=1.0, cutmix=0.0, lr_step="epoch",
                          warmup_epochs=5, warmup_start_factor=0.01, decay_bn_bias=True, grad_accumulation=1,
                          kd_t2=True, val_resize="none", normalization="tiny-imagenet", image_size=64, ema=0.0),
            "demo": {},
        },
        official_arithmetic=True,
    ),
}


def get_recipe(name: str | None) -> Recipe:
    name = DEFAULT_RECIPE if name is None else name
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)} ('srel-fast recipes' lists them).")
    return RECIPES[name]


def recipe_fields(cfg_or_cls) -> tuple[str, ...]:
    return tuple(getattr(cfg_or_cls, "RECIPE_FIELDS", ()))


def resolve_recipe(cfg, stage: str):
    """Fill every recipe field of ``cfg`` that is ``None`` from its recipe.

    Returns ``(resolved config, record)``; the record says which values came
    from the recipe and which explicit values override it. Idempotent: a
    resolved config comes back unchanged."""
    recipe = get_recipe(cfg.recipe)
    if stage in recipe.not_covered:
        raise UserError(f"the {recipe.name} recipe has no {stage} stage: {recipe.not_covered[stage]}.")
    values = recipe.values.get(stage, {})
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(values) - names)
    if unknown:  # a recipe that names a field the config lacks is a bug in this file
        raise AssertionError(f"recipe {recipe.name} sets unknown {stage} fields {unknown}")
    updates = {k: v for k, v in values.items() if getattr(cfg, k) is None}
    overrides = {k: {"value": getattr(cfg, k), "recipe": v} for k, v in values.items()
                 if getattr(cfg, k) is not None and getattr(cfg, k) != v}
    resolved = dataclasses.replace(cfg, recipe=recipe.name, **updates)
    record = {"name": recipe.name, "from_recipe": {k: updates[k] for k in sorted(updates)},
              "overrides": {k: overrides[k] for k in sorted(overrides)}}
    return resolved, record


def apply_recipe(cfg, stage: str):
    return resolve_recipe(cfg, stage)[0]


def recipe_help(stage: str, field_name: str) -> str:
    """'srel: X, sre2l-imagenet: Y, ...' for a flag's help text."""
    parts = []
    for r in RECIPES.values():
        if stage in r.not_covered:
            continue
        vals = r.values.get(stage, {})
        if field_name in vals:
            v = vals[field_name]
            parts.append(f"{r.name}: {('on' if v else 'off') if isinstance(v, bool) else v}")
        elif field_name in r.stage_rules.get(stage, {}):
            parts.append(f"{r.name}: {r.stage_rules[stage][field_name]}")
    return "; ".join(parts)


def describe_recipes(name: str | None = None) -> str:
    """The text of 'srel-fast recipes': every recipe with every value it sets."""
    chosen = [get_recipe(name)] if name else list(RECIPES.values())
    lines = []
    for r in chosen:
        tag = " (default)" if r.name == DEFAULT_RECIPE else ""
        lines.append(f"{r.name}{tag}: {r.summary}")
        for stage in STAGES:
            if stage in r.not_covered:
                lines.append(f"  {stage}: none ({r.not_covered[stage]})")
                continue
            vals = r.values.get(stage, {})
            rules = r.stage_rules.get(stage, {})
            if not vals and not rules:
                lines.append(f"  {stage}: nothing (the stages' values of this recipe apply)")
                continue
            lines.append(f"  {stage}:")
            for k in sorted(set(vals) | set(rules)):
                flag = "--" + k.replace("_", "-")
                if k not in vals:
                    lines.append(f"    {flag}: not set, the stage's rule: {rules[k]}")
                elif isinstance(vals[k], bool):
                    lines.append(f"    {flag if vals[k] else '--no-' + k.replace('_', '-')}")
                else:
                    lines.append(f"    {flag} {vals[k]}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


@dataclass
class RecipesConfig:
    name: str | None = None     # one recipe; default: all


def run_recipes(cfg: RecipesConfig) -> None:
    print(describe_recipes(cfg.name), end="")
