"""Models: recovery teachers and students.

- ``resnet18``/``resnet50``/``resnet101``: torchvision's, state dicts identical
  to torchvision's so off-the-shelf ImageNet V1 weights load unchanged.
- ``resnet18-small``/``resnet50-small``: the same with the 7x7 stride-2 stem
  replaced by a 3x3 stride-1 conv and no max-pool (Tiny-ImageNet, CIFAR,
  Fashion-MNIST), any input channel count.
- ``convnet3``/``convnet4``: the ConvNet-D3/D4 of the dataset-distillation
  literature (conv 3x3 -> norm -> ReLU -> avg-pool 2, width 128) with
  BatchNorm; ``convnet3-in``/``convnet4-in``: the instance-norm variant used
  by DM and MTT (GroupNorm with one group per channel).
- any other torchvision classification model by name (mobilenet_v2,
  efficientnet_b0, regnet_y_400mf, densenet121, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import UserError

OUR_ARCHS = (
    "convnet3", "convnet4", "convnet3-in", "convnet4-in",
    "resnet18", "resnet50", "resnet101", "resnet18-small", "resnet50-small",
    "bn-vit-tiny", "bn-vit-tiny-small",
)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    arch: str
    num_classes: int
    in_channels: int = 3
    image_size: int = 224
    width: int = 128  # ConvNet width

    def to_dict(self) -> dict:
        return asdict(self)


class ConvNet(nn.Module):
    """ConvNet-D{depth}: [conv3x3 -> norm -> relu -> avgpool2] x depth -> linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 3, width: int = 128,
                 norm: str = "batch", image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            layers.append(nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(width, width, affine=True))
            layers.append(nn.ReLU(inplace=True))
            layers.append(nn.AvgPool2d(2, 2))
            c, size = width, max(size // 2, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class GreyToRGB(nn.Module):
    """Feeds a 1-channel image to a torchvision model built for RGB input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _resnet(spec: ModelSpec, small: bool) -> nn.Module:
    import torchvision

    name = spec.arch.replace("-small", "")
    model = torchvision.models.get_model(name, weights=None, num_classes=spec.num_classes)
    if small:
        model.conv1 = nn.Conv2d(spec.in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif spec.in_channels != 3:
        model.conv1 = nn.Conv2d(spec.in_channels, 64, 7, 2, 3, bias=False)
    return model


def build_model(spec: ModelSpec) -> nn.Module:
    arch = spec.arch
    if arch in ("convnet3", "convnet4", "convnet3-in", "convnet4-in"):
        return ConvNet(spec.num_classes, spec.in_channels, depth=int(arch[7]), width=spec.width,
                       norm="instance" if arch.endswith("-in") else "batch", image_size=spec.image_size)
    if arch in ("resnet18", "resnet50", "resnet101"):
        return _resnet(spec, small=False)
    if arch in ("resnet18-small", "resnet50-small"):
        return _resnet(spec, small=True)
    if arch.startswith("bn-vit-tiny"):
        from .bn_vit import build_bn_vit

        return build_bn_vit(spec)
    names = _torchvision_names()
    if arch not in names:
        raise UserError(
            f"unknown arch {arch!r}; use one of {', '.join(OUR_ARCHS)} or a torchvision classification model name."
        )
    import torchvision

    kwargs = {"weights": None, "num_classes": spec.num_classes}
    if arch.startswith("vit_") or arch.startswith("swin") or arch.startswith("maxvit"):
        kwargs["image_size"] = spec.image_size
    model = torchvision.models.get_model(arch, **kwargs)
    if spec.in_channels == 1:
        model = GreyToRGB(model)
    elif spec.in_channels != 3:
        raise UserError(f"arch {arch!r} takes 1- or 3-channel images, not {spec.in_channels}.")
    return model


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def require_batchnorm(model: nn.Module, arch: str) -> None:
    if not bn_layers(model):
        raise UserError(
            f"model {arch!r} has no BatchNorm layer; recovery matches BatchNorm statistics, so pick a model with BN "
            "(e.g. convnet3, resnet18-small, resnet18)."
        )


# torchvision's ImageNet V1 weight files, as named in the torch hub cache.
HUB_V1_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
}


def hub_cache_weights(arch: str) -> str | None:
    """Path of torchvision's IMAGENET1K_V1 file for ``arch`` in the torch hub
    cache, if present (it is never downloaded)."""
    fname = HUB_V1_FILES.get(arch)
    if fname is None:
        try:
            import torchvision

            weights = torchvision.models.get_model_weights(arch)
            fname = os.path.basename(weights.IMAGENET1K_V1.url)
        except Exception:  # noqa: BLE001
            return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
    return path if os.path.exists(path) else None


CHECKPOINT_FORMAT = "srel-fast-checkpoint"


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    meta: dict


def load_state_dict_file(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"weights file {path} does not exist.")
    try:
        # Checkpoints of torchvision's reference training scripts (and so the official
        # Tiny-ImageNet teachers) pickle their argparse.Namespace under "args": allowed,
        # nothing else beyond tensors and plain containers.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"weights file {path} is not a PyTorch checkpoint ({type(exc).__name__}).") from None
    if not isinstance(obj, dict):
        raise UserError(f"weights file {path} holds a {type(obj).__name__}, not a state dict or srel-fast checkpoint.")
    return obj


def _load_into(model: nn.Module, state: dict, path: str, arch: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"weights file {path} does not match arch {arch!r}: {detail}") from None


def plain_state_dict(obj: dict) -> dict:
    """The model weights of a plain checkpoint: a bare state dict, or one under "model"
    (torchvision's reference scripts, the official Tiny-ImageNet teachers) or
    "state_dict"; a "module." prefix left by DataParallel/DDP is removed."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_model(weights: str | None, arch: str | None = None, num_classes: int | None = None,
               in_channels: int = 3, image_size: int = 224, width: int = 128,
               normalization: str = "imagenet") -> LoadedModel:
    """Load a recovery/teacher model.

    ``weights`` is an srel-fast squeeze checkpoint (carries arch, class count
    and normalisation), a plain checkpoint (then ``arch`` is required and the
    input is normalised with ``normalization``: a name in ``MEAN_STD``), ``None``
    to look in the torch hub cache, or ``"random"`` for an untrained model
    (benchmarks only)."""
    mean, std = named_mean_std(normalization)
    if weights not in (None, "random"):
        obj = load_state_dict_file(weights)
        if obj.get("format") == CHECKPOINT_FORMAT:
            spec = ModelSpec(**obj["model"])
            if arch is not None and arch != spec.arch:
                raise UserError(f"checkpoint {weights} holds arch {spec.arch!r}, not the requested {arch!r}.")
            model = build_model(spec)
            _load_into(model, obj["state_dict"], weights, spec.arch)
            return LoadedModel(model, spec, tuple(obj["mean"]), tuple(obj["std"]), list(obj["classes"]), obj)
        if arch is None:
            raise UserError(f"weights file {weights} is a plain state dict; say which model it is with --arch.")
        state = plain_state_dict(obj)
        fc = [v for k, v in state.items() if k.endswith(("fc.weight", "classifier.weight", "head.weight"))]
        n_cls = int(fc[-1].shape[0]) if fc else (num_classes or 1000)
        spec = ModelSpec(arch, n_cls, in_channels, image_size, width)
        model = build_model(spec)
        _load_into(model, state, weights, arch)
        return LoadedModel(model, spec, mean, std, [str(i) for i in range(n_cls)],
                           {"source": weights, "normalization": normalization})
    if arch is None:
        raise UserError("no model given: pass --weights FILE (a squeeze checkpoint or state dict) or --arch NAME.")
    spec = ModelSpec(arch, num_classes or 1000, in_channels, image_size, width)
    model = build_model(spec)
    if weights is None:
        cached = hub_cache_weights(arch)
        if cached is None:
            raise UserError(
                f"no weights for {arch!r}: pass --weights FILE (torchvision state dict or squeeze checkpoint); "
                "none is in the torch hub cache and nothing is downloaded (use --weights random for an untrained model)."
            )
        _load_into(model, load_state_dict_file(cached), cached, arch)
        source = cached
    else:
        source = "random"
    return LoadedModel(model, spec, mean, std, [str(i) for i in range(spec.num_classes)],
                       {"source": source, "normalization": normalization})


IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The official Tiny-ImageNet code (SRe2L small_dataset/utils.py, zeyuanyin/tiny-imagenet).
TINY_IMAGENET_MEAN_STD = ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))
MEAN_STD = {"imagenet": IMAGENET_MEAN_STD, "tiny-imagenet": TINY_IMAGENET_MEAN_STD}


def named_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if name not in MEAN_STD:
        raise UserError(f"unknown normalisation {name!r}; use one of {', '.join(MEAN_STD)}.")
    return MEAN_STD[name]


def save_checkpoint(path: str, model: nn.Module, spec: ModelSpec, mean, std, classes, **meta) -> None:
    from .files import torch_save_atomic

    obj = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "model": spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "mean": list(mean),
        "std": list(std),
        "classes": list(classes),
        **meta,
    }
    torch_save_atomic(obj, path)


@contextlib.contextmanager
def frozen_weights_in_amp_dtype(model: nn.Module, dtype: torch.dtype | None):
    """For the with block, the Conv and Linear weights and biases of a frozen model are
    stored in the autocast dtype (bf16/fp16; None: nothing changes); the float32 tensors
    come back on exit.

    Why: autocast casts them to that dtype for every forward anyway, and caches the cast
    only for leaf tensors that require grad, which frozen weights do not: every step
    re-read and re-wrote every weight (ResNet-18 on the 2-core CPU: about 3 ms a step).
    Same numbers: the conv and linear ops run on the same cast values either way.
    BatchNorm keeps its float32 parameters and running statistics (the matching targets)."""
    saved = []
    if dtype is not None:
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                for p in (m.weight, m.bias):
                    if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                        saved.append((p, p.data))
                        p.data = p.data.to(dtype)
    try:
        yield model
    finally:
        for p, data in saved:
            p.data = data
