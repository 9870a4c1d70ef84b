"""Faithful re-implementations of one synthetic-data update of two baselines,
for the recovery-step benchmark (srel_fast/bench/recover_step/).

DM  -- Distribution Matching (Zhao & Bilen, "Dataset Condensation with
       Distribution Matching", WACV 2023; code: VICO-UoE/DatasetCondensation,
       main_DM.py). One update = a fresh randomly initialised ConvNet (instance
       norm, parameters frozen, net.train()), then for EVERY class: 256 real
       images and the IPC synthetic images of that class, the same DSA
       augmentation on both (Siamese: one seed, batch-mode parameters),
       embeddings (features before the classifier), loss += ||mean real emb -
       mean syn emb||^2; one backward for the summed loss; SGD(lr_img=1.0,
       momentum=0.5) on the images.
MTT -- Matching Training Trajectories (Cazenavette et al., CVPR 2022; code:
       GeorgeCazenavette/mtt-distillation, distill.py). One update = start
       parameters theta_t from a random expert epoch t < max_start_epoch,
       target theta*_{t+M} (M = expert_epochs); syn_steps student steps of SGD
       with a learnable lr on minibatches (batch_syn) of DSA-augmented
       synthetic images, each gradient taken with create_graph=True on the
       flat parameter vector (their ReparamModule; here
       torch.func.functional_call); loss = ||theta_N - theta*||^2 /
       ||theta_t - theta*||^2 (both / num_params, which cancels); one backward
       through the whole unrolled chain into the images and syn_lr;
       SGD(lr_img, momentum 0.5) on images, SGD(lr_lr, momentum 0.5) on syn_lr.

DSA (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation") with strategy 'color_crop_cutout_flip_scale_rotate' and their
ParamDiffAug defaults, aug_mode 'S': each call picks ONE of the six families
at random and applies it. Their code builds affine matrices with Python list
comprehensions over the batch; here the same draws are built with tensor ops
(generous to the baselines: the arithmetic on the images is identical, the
host overhead is lower).

Only the timing-relevant parts are reproduced: real images are random
tensors of the right shape and the expert trajectory buffer holds random
parameter vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass
class ParamDiffAug:
    """DSA's ParamDiffAug defaults."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def dsa_draw(n: int, height: int, width: int, generator: torch.Generator, batchmode: bool,
             strategy: str = DSA_STRATEGY, param: ParamDiffAug | None = None, family: str | None = None) -> dict:
    """Draw the parameters of one DiffAugment call (aug_mode 'S').

    ``batchmode=True`` is DSA's seeded (Siamese) mode: one parameter set for
    the whole batch, so the same draw can be applied to the real batch and the
    synthetic batch of a class whatever their sizes (stored with leading size
    1). ``batchmode=False`` (MTT, seed=-1) draws per image."""
    p = param or ParamDiffAug()
    families = strategy.split("_")
    if family is None:
        family = families[int(torch.randint(0, len(families), (1,), generator=generator))]
    k = 1 if batchmode else n

    def rand(*shape):
        return torch.rand(shape, generator=generator)

    out: dict = {"family": family}
    if family == "color":
        out["b"] = rand(k, 1, 1, 1)
        out["s"] = rand(k, 1, 1, 1)
        out["c"] = rand(k, 1, 1, 1)
    elif family == "crop":
        sx, sy = int(height * p.ratio_crop_pad + 0.5), int(width * p.ratio_crop_pad + 0.5)
        out["tx"] = torch.randint(-sx, sx + 1, (k, 1, 1), generator=generator)
        out["ty"] = torch.randint(-sy, sy + 1, (k, 1, 1), generator=generator)
    elif family == "cutout":
        cs = (int(height * p.ratio_cutout + 0.5), int(width * p.ratio_cutout + 0.5))
        out["cutout_size"] = cs
        out["ox"] = torch.randint(0, height + (1 - cs[0] % 2), (k, 1, 1), generator=generator)
        out["oy"] = torch.randint(0, width + (1 - cs[1] % 2), (k, 1, 1), generator=generator)
    elif family == "flip":
        out["f"] = rand(k, 1, 1, 1)
    elif family == "scale":
        r = p.ratio_scale
        sx = rand(k) * (r - 1.0 / r) + 1.0 / r
        sy = rand(k) * (r - 1.0 / r) + 1.0 / r
        z = torch.zeros_like(sx)
        out["theta"] = torch.stack([torch.stack([sx, z, z], 1), torch.stack([z, sy, z], 1)], 1)
    elif family == "rotate":
        t = (rand(k) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
        z = torch.zeros_like(t)
        out["theta"] = torch.stack([torch.stack([torch.cos(t), torch.sin(-t), z], 1),
                                    torch.stack([torch.sin(t), torch.cos(t), z], 1)], 1)
    else:
        raise ValueError(f"unknown DSA family {family!r}")
    return out


def dsa_apply(x: torch.Tensor, d: dict, param: ParamDiffAug | None = None) -> torch.Tensor:
    """Apply drawn DSA parameters to x (N, C, H, W); differentiable in x.
    Same arithmetic as DSA's rand_* functions."""
    p = param or ParamDiffAug()
    n, _, h, w = x.shape
    dev = x.device

    def per(t):  # (k, ...) -> (n, ...) on x's device
        t = t.to(dev)
        return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t

    fam = d["family"]
    if fam == "color":
        x = x + (per(d["b"]).to(x.dtype) - 0.5) * p.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (per(d["s"]).to(x.dtype) * p.saturation) + m
        m = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - m) * (per(d["c"]).to(x.dtype) + p.contrast) + m
    elif fam == "crop":
        gb, gx, gy = torch.meshgrid(torch.arange(n, device=dev), torch.arange(h, device=dev),
                                    torch.arange(w, device=dev), indexing="ij")
        gx = torch.clamp(gx + per(d["tx"]) + 1, 0, h + 1)
        gy = torch.clamp(gy + per(d["ty"]) + 1, 0, w + 1)
        x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
        x = x_pad.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)
    elif fam == "cutout":
        cs = d["cutout_size"]
        gb, gx, gy = torch.meshgrid(torch.arange(n, device=dev), torch.arange(cs[0], device=dev),
                                    torch.arange(cs[1], device=dev), indexing="ij")
        gx = torch.clamp(gx + per(d["ox"]) - cs[0] // 2, min=0, max=h - 1)
        gy = torch.clamp(gy + per(d["oy"]) - cs[1] // 2, min=0, max=w - 1)
        mask = torch.ones(n, h, w, dtype=x.dtype, device=dev)
        mask[gb, gx, gy] = 0
        x = x * mask.unsqueeze(1)
    elif fam == "flip":
        x = torch.where(per(d["f"]) < p.prob_flip, x.flip(3), x)
    elif fam in ("scale", "rotate"):
        theta = per(d["theta"]).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, align_corners=True)
    return x.contiguous()


def convnet_in(num_classes: int, channels: int, image_size: int, depth: int = 4, width: int = 128) -> nn.Module:
    """Their ConvNet (ConvNetD4 for Tiny-ImageNet): conv3x3 -> instancenorm
    (GroupNorm(C, C, affine)) -> ReLU -> avgpool2, width 128."""
    from srel_fast.models import ConvNet

    return ConvNet(num_classes, channels, depth=depth, width=width, norm="instance", image_size=image_size)


# ---------------------------------------------------------------------------- DM
@dataclass
class DMConfig:
    num_classes: int = 200          # Tiny-ImageNet
    ipc: int = 10
    image_size: int = 64
    channels: int = 3
    depth: int = 3                  # get_default_convnet_setting (ConvNetD4: 4)
    width: int = 128
    batch_real: int = 256           # their --batch_real
    real_pool_per_class: int = 500  # Tiny-ImageNet train images per class (their images_all lives on the device)
    lr_img: float = 1.0             # their --lr_img
    momentum: float = 0.5
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY
    seed: int = 0


def dm_loss(embed, image_syn: torch.Tensor, get_real, ipc: int, classes: list[int],
            generator: torch.Generator | None, dsa: bool = True, strategy: str = DSA_STRATEGY) -> torch.Tensor:
    """sum over ``classes`` of ||mean(embed(A(real_c))) - mean(embed(A(syn_c)))||^2,
    with one Siamese DSA draw per class shared by real and synthetic images.
    ``get_real(c)`` fetches class c's real batch inside the loop, as their code does,
    so only one class's real batch is alive at a time."""
    loss = image_syn.new_zeros(())
    size_h, size_w = image_syn.shape[2], image_syn.shape[3]
    for c in classes:
        img_real = get_real(c)
        img_syn = image_syn[c * ipc:(c + 1) * ipc]
        if dsa:
            d = dsa_draw(1, size_h, size_w, generator, batchmode=True, strategy=strategy)
            img_real = dsa_apply(img_real, d)
            img_syn = dsa_apply(img_syn, d)
        output_real = embed(img_real).detach()
        output_syn = embed(img_syn)
        loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    return loss


class DMStep:
    """One DM update per ``step()``."""

    def __init__(self, cfg: DMConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        g = torch.Generator().manual_seed(cfg.seed)
        self.gen = g
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        # Stand-in for their images_all (the whole real train set on the device) and for
        # init='real' synthetic images: random tensors of the right shapes.
        self.images_all = torch.randn((cfg.num_classes * cfg.real_pool_per_class, *shape), generator=g).to(device)
        self.image_syn = torch.randn((cfg.num_classes * cfg.ipc, *shape), generator=g).to(device).requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=cfg.lr_img, momentum=cfg.momentum)
        self.images_per_iteration = cfg.num_classes * cfg.ipc

    def get_images(self, c: int, n: int) -> torch.Tensor:
        # their get_images: np.random.permutation(indices_class[c])[:n] -> images_all[idx]
        k = self.cfg.real_pool_per_class
        idx = torch.randperm(k, generator=self.gen)[:n] + c * k
        return self.images_all[idx.to(self.device)]

    def new_net(self) -> nn.Module:
        cfg = self.cfg
        net = convnet_in(cfg.num_classes, cfg.channels, cfg.image_size, cfg.depth, cfg.width).to(self.device)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        return net

    def step(self, it: int = 0) -> torch.Tensor:
        cfg = self.cfg
        net = self.new_net()  # a fresh random model every iteration
        classes = list(range(cfg.num_classes))
        loss = dm_loss(net.embed, self.image_syn, lambda c: self.get_images(c, cfg.batch_real), cfg.ipc, classes,
                       self.gen, cfg.dsa, cfg.dsa_strategy)
        self.optimizer_img.zero_grad()
        loss.backward()
        self.optimizer_img.step()
        return loss.detach()


# ---------------------------------------------------------------------------- MTT
@dataclass
class MTTConfig:
    """Defaults: their Tiny-ImageNet IPC 10 command, --syn_steps=20 --expert_epochs=2
    --max_start_epoch=40 --lr_img=10000 --lr_lr=1e-04 --lr_teacher=0.01
    --batch_syn 200 (DSA on, no ZCA), with the default ConvNet (depth 3)."""

    num_classes: int = 200
    ipc: int = 10
    image_size: int = 64
    channels: int = 3
    depth: int = 3
    width: int = 128
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 40
    buffer_epochs: int = 6          # epochs actually held in the stand-in buffer (start drawn below it)
    batch_syn: int | None = 200     # None: the whole synthetic set each step (their default)
    lr_img: float = 10000.0
    lr_lr: float = 1e-4
    lr_teacher: float = 0.01        # initial syn_lr
    momentum: float = 0.5
    dsa: bool = True
    dsa_strategy: str = DSA_STRATEGY
    seed: int = 0


def flat_to_params(model: nn.Module, flat: torch.Tensor) -> dict:
    """Views of a flat parameter vector under the model's parameter names (ReparamModule)."""
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def mtt_unroll(model: nn.Module, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
               labels: torch.Tensor, syn_lr: torch.Tensor, syn_steps: int, batch_syn: int,
               generator: torch.Generator | None, dsa: bool = True, strategy: str = DSA_STRATEGY) -> torch.Tensor:
    """The MTT objective for one start epoch (their distill.py inner loop)."""
    from torch.func import functional_call

    student_params = [start.clone().requires_grad_(True)]
    indices_chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not indices_chunks:
            indices = torch.randperm(len(images), generator=generator)
            indices_chunks = list(torch.split(indices, batch_syn))
        these = indices_chunks.pop().to(images.device)
        x = images[these]
        y = labels[these]
        if dsa:
            d = dsa_draw(x.shape[0], x.shape[2], x.shape[3], generator, batchmode=False, strategy=strategy)
            x = dsa_apply(x, d)
        out = functional_call(model, flat_to_params(model, student_params[-1]), (x,))
        ce = F.cross_entropy(out, y)
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = start.numel()
    param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
    param_dist = F.mse_loss(start, target, reduction="sum") / num_params
    return param_loss / param_dist


class MTTStep:
    """One MTT update per ``step()``."""

    def __init__(self, cfg: MTTConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        g = torch.Generator().manual_seed(cfg.seed)
        self.gen = g
        self.model = convnet_in(cfg.num_classes, cfg.channels, cfg.image_size, cfg.depth, cfg.width).to(device)
        self.model.train()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        # Stand-in for the saved expert trajectory (their buffer is loaded on the host and
        # moved to the device each iteration): random flat parameter vectors.
        n_epochs = max(cfg.buffer_epochs, cfg.expert_epochs + 1)
        # A random walk, so that consecutive epochs are close as in a real trajectory.
        self.buffer = [torch.randn(self.num_params, generator=g) * 0.05]
        for _ in range(n_epochs - 1):
            self.buffer.append(self.buffer[-1] + torch.randn(self.num_params, generator=g) * 0.005)
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        self.image_syn = torch.randn((cfg.num_classes * cfg.ipc, *shape), generator=g).to(device).requires_grad_(True)
        self.label_syn = torch.arange(cfg.num_classes).repeat_interleave(cfg.ipc).to(device)
        self.syn_lr = torch.tensor(cfg.lr_teacher, device=device).requires_grad_(True)
        self.optimizer_img = torch.optim.SGD([self.image_syn], lr=cfg.lr_img, momentum=cfg.momentum)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        self.batch_syn = cfg.batch_syn or len(self.image_syn)
        self.images_per_iteration = cfg.num_classes * cfg.ipc

    def step(self, it: int = 0) -> torch.Tensor:
        cfg = self.cfg
        # their: start_epoch = np.random.randint(0, max_start_epoch); the stand-in buffer is
        # shorter, so the draw is folded into it (the cost does not depend on the epoch).
        hi = min(cfg.max_start_epoch, len(self.buffer) - cfg.expert_epochs)
        start_epoch = int(torch.randint(0, hi, (1,), generator=self.gen))
        start = self.buffer[start_epoch].to(self.device)
        target = self.buffer[start_epoch + cfg.expert_epochs].to(self.device)
        grand_loss = mtt_unroll(self.model, start, target, self.image_syn, self.label_syn, self.syn_lr,
                                cfg.syn_steps, self.batch_syn, self.gen, cfg.dsa, cfg.dsa_strategy)
        self.optimizer_img.zero_grad()
        self.optimizer_lr.zero_grad()
        grand_loss.backward()
        self.optimizer_img.step()
        self.optimizer_lr.step()
        return grand_loss.detach()


__all__ = ["DSA_STRATEGY", "ParamDiffAug", "dsa_draw", "dsa_apply", "convnet_in", "DMConfig", "DMStep", "dm_loss",
           "MTTConfig", "MTTStep", "mtt_unroll", "flat_to_params"]
