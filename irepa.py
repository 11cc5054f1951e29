"""
iREPA in one file: SiT with REPA/iREPA alignment, its objectives (flow matching, REPA-E, MeanFlow), samplers, the
spatial-structure metrics, the data, the DDP training loop and the command line.

iREPA ("What matters for Representation Alignment: Global Information or Spatial Structure?", arXiv 2512.10794) makes
two changes to REPA: the 3-layer MLP projector becomes one 3x3 convolution on the token grid, and the teacher tokens
get a spatial z-score over the token axis, y = (f - gamma * mean_T f) / (std_T f + 1e-6).

    python irepa.py --demo                                                   # offline, CPU, ~4 minutes
    python irepa.py --prepare --data-path /data/imagenet/train --out-dir data/in256          # SD-VAE latents, once
    torchrun --nproc_per_node=8 irepa.py --encoder dinov2 --data-path data/in256 --out-dir out/xl-irepa
    torchrun --nproc_per_node=8 irepa.py ... --recipe repa | --repa-e | --meanflow            # the other recipes
    python irepa.py metrics --encoder dinov2 | correlate results.csv | spnorm-viz | export-vae   # the paper's study

Read top to bottom: the model; the spatial normalization and the losses; the samplers; the spatial metrics; the data;
training (REPA-E included); the study commands; the command line. Conventions (fixed, see DESIGN.md): time runs
data -> noise, x_t = (1 - t) x + t eps, the network predicts the velocity v = eps - x, samplers integrate t from 1
to 0; the null label is index `num_classes`.
"""
import argparse
import colorsys
import contextlib
import copy
import json
import math
import os
import resource
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# -----------------------------------------------------------------------------
# The two recipes of the paper. Every knob stays overridable from the command line.
RECIPES = {
    'repa':  dict(projector='mlp',  spnorm='none',   proj_coeff=0.5),  # REPA: MLP, raw teacher tokens, lambda 0.5
    'irepa': dict(projector='conv', spnorm='zscore', proj_coeff=1.0),  # iREPA: 3x3 conv, spatial z-score, lambda 1.0
}

# -----------------------------------------------------------------------------
# SiT: a DiT-style transformer with adaLN-Zero blocks, predicting the velocity


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D) with per-image (N, D) shift/scale


def timestep_embedding(t, dim=256, max_period=10000):
    """[cos, sin] of `dim // 2` frequencies of the raw t in [0, 1] (no x1000, unlike DDPM-style models)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)  # (N, dim)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos position embedding (MAE): first half encodes the column, second half the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    row, col = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')  # token k = row * grid + col

    def emb1d(pos):
        a = pos.flatten().double()[:, None] * omega[None]  # (T, dim/4)
        return torch.cat([a.sin(), a.cos()], dim=1)  # (T, dim/2)
    return torch.cat([emb1d(col), emb1d(row)], dim=1).float().unsqueeze(0)  # (1, T, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, freq_size=256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_size))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index `num_classes`, for the null label used by classifier-free guidance."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y, train):
        if train and self.dropout_prob > 0:  # label dropout happens here, in train mode only
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"SiT was built for {self.input_size}x{self.input_size} inputs, got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D), row-major tokens


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, hd)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class SiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c gives shift, scale and gate of both branches; gates start at zero."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class Projector(nn.Module):
    """Maps SiT tokens (N, T, D) to one teacher's width (N, T, z_dim).

    'mlp' (REPA) acts on each token alone: Linear-SiLU-Linear-SiLU-Linear. 'conv' (iREPA) is a single k x k
    convolution on the row-major token grid, no activation, so each output token also sees its neighbours.
    """
    def __init__(self, kind, hidden_size, z_dim, projector_dim=2048, kernel=3):
        super().__init__()
        if kind == 'mlp':
            self.projection_layer = nn.Sequential(
                nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                nn.Linear(projector_dim, z_dim))
        elif kind == 'conv':
            if kernel % 2 == 0:
                raise ValueError(f"conv projector kernel must be odd to keep the token grid, got {kernel}")
            self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel, padding=kernel // 2)
        else:
            raise ValueError(f"unknown projector {kind!r}; accepted: 'mlp' (REPA), 'conv' (iREPA)")
        self.kind = kind

    def forward(self, x):
        if self.kind == 'mlp':
            return self.projection_layer(x)
        N, T, D = x.shape
        H = math.isqrt(T)
        if H * H != T:
            raise ValueError(f"the conv projector needs a square token grid, got T={T} tokens")
        x = x.view(N, H, H, D).permute(0, 3, 1, 2)  # (N, D, H, W) as a channels-last view: no copy
        return self.projection_layer(x).permute(0, 2, 3, 1).reshape(N, T, -1)  # (N, T, z_dim)


class SiT(nn.Module):
    """SiT with one projector per teacher on the output of block `encoder_depth` (1-based, before any norm)."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1, qk_norm=False,
                 encoder_depth=8, z_dims=(768,), projector='conv', proj_kernel=3, projector_dim=2048, latent_bn=False,
                 meanflow=False):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in 1..{depth} (the block whose output is aligned), got {encoder_depth}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if meanflow:  # MeanFlow: a second time embedder on h = t - r; labels are dropped in the loss, not in here
            self.h_embedder = TimestepEmbedder(hidden_size)
            self.y_embedder.dropout_prob = 0.0  # the table keeps its null row for guidance
        self.register_buffer('pos_embed', sincos_pos_embed(hidden_size, input_size // patch_size))  # fixed, (1, T, D)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([Projector(projector, hidden_size, z, projector_dim, proj_kernel) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        if latent_bn:  # REPA-E: the VAE moves, so latents are normalized by running batch statistics (no affine: it
            # could cheat the diffusion loss). The loss applies it; forward and the samplers work in normalized space.
            self.bn = nn.BatchNorm2d(in_channels, eps=1e-4, momentum=0.1, affine=False)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # xavier for every Linear, projector MLP included; the conv projector keeps torch's init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # patch embedding initialised like a Linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in self.h_embedder.mlp[::2] if hasattr(self, 'h_embedder') else []:
            nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: each block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x):
        p, C = self.patch_size, self.in_channels
        N, T, _ = x.shape
        h = math.isqrt(T)
        x = x.view(N, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, h * p)

    def forward(self, x, t, y, align=True, align_only=False, r=None):
        """x (N, C, H, W) at times t (N,) with labels y (N,) -> velocity (N, C, H, W) and [projected tokens (N, T, z)].
        align_only stops after block encoder_depth and returns (None, zs): REPA-E's VAE step needs nothing more.
        MeanFlow models take r (N,) <= t and return the average velocity over [r, t]; r = t (default) is v."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        if hasattr(self, 'h_embedder'):
            c = c + self.h_embedder(t - (t if r is None else r))
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (align or align_only) and i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]
                if align_only:
                    return None, zs
        return self.unpatchify(self.final_layer(x, c)), zs


# depth, width, heads. S/B/L/XL are the paper's; T (tiny) is ours, for the CPU demo and tests.
SIZES = {'T': (6, 192, 3), 'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
SiT_models = {f'SiT-{s}/{p}': partial(SiT, depth=d, hidden_size=h, num_heads=n, patch_size=p)
              for s, (d, h, n) in SIZES.items() for p in (2, 4, 8)}


def sit_args(name, **kwargs):
    """All constructor arguments of SiT_models[name](**kwargs); encoder_depth defaults to 4 (S, B), 8 (L, XL), 2 (T)."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(SiT_models)}")
    if kwargs.get('encoder_depth') is None:
        kwargs['encoder_depth'] = {'T': 2, 'S': 4, 'B': 4}.get(name[4:].split('/')[0], 8)
    return {**SiT_models[name].keywords, **kwargs}


def build_sit(name, **kwargs):
    return SiT(**sit_args(name, **kwargs))


def load_state(model, state_dict, what='checkpoint'):
    """load_state_dict(strict=True), but a mismatch says which keys and shapes differ instead of a wall of text."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the {what}, {tuple(own[k].shape)} in the model"
              for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        lines = [f"the {what} was made for another model config:"]
        if missing:
            lines.append(f"  missing from the {what} ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"  not in the model ({len(unexpected)}): {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        lines += ['  ' + s for s in sorted(shapes)[:6]]
        raise ValueError('\n'.join(lines))
    model.load_state_dict(state_dict)


# -----------------------------------------------------------------------------
# Spatial normalization of the teacher tokens, and the losses


def spatial_norm(f, gamma=0.6, eps=1e-6):
    """iREPA's spatial z-score of teacher tokens (B, T, D): over the token axis, per image and channel.

    gamma < 1 keeps part of the global (mean) component; the std is unbiased and eps is added to it (official code).
    """
    f = f.float()
    return (f - gamma * f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + eps)


def teacher_targets(feats, spnorm='zscore', gamma=0.6):
    """The alignment targets: each teacher's patch tokens, spatially normalized or not ('none' = REPA)."""
    if spnorm not in ('none', 'zscore'):
        raise ValueError(f"unknown spatial norm {spnorm!r}; accepted: 'none', 'zscore'")
    return [spatial_norm(f, gamma) if spnorm == 'zscore' else f for f in feats]


def interpolate(x, noise, t):
    """The linear path: x_t = (1 - t) x + t eps, so t = 0 is data and t = 1 is noise; its velocity is eps - x."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise


def alignment_loss(zs, targets):
    """Mean over teachers, images and tokens of -cos(projected, target); -1 is perfect alignment."""
    if not zs:
        return torch.zeros(())
    cos = [(F.normalize(z.float(), dim=-1) * F.normalize(y.float(), dim=-1)).sum(-1).mean() for z, y in zip(zs, targets)]
    return -torch.stack(cos).mean()


def flow_loss(model, x, y, targets, t=None, noise=None):
    """Flow matching with uniform t and velocity target, plus alignment: {'flow': MSE, 'align': alignment loss}."""
    t = torch.rand(x.shape[0], device=x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    v, zs = model(interpolate(x, noise, t), t, y, align=bool(targets))
    return dict(flow=F.mse_loss(v.float(), (noise - x).float()), align=alignment_loss(zs, targets).to(x.device))


# -----------------------------------------------------------------------------
# MeanFlow (--meanflow): the network learns the average velocity u(z, r, t) = 1/(t - r) int_r^t v, so that one step
# z_r = z_t - (t - r) u jumps along the flow. Differentiating (t - r) u = int_r^t v in t gives the MeanFlow identity
# u = v - (t - r) du/dt with du/dt = v d_z u + d_t u (dr/dt = 0), which makes the regression target.

MEANFLOW = dict(p_mean=-0.4, p_std=1.0, ratio=0.25, norm_c=0.01, norm_p=1.0, label_drop=0.1)  # MeanFlow's ImageNet config


def sample_tr(n, device, p_mean=-0.4, p_std=1.0, ratio=0.25):
    """t >= r, both logit-normal(p_mean, p_std); a random `ratio` of the rows keeps r != t, the others r = t."""
    t, r = torch.sigmoid(torch.randn(2, n, device=device) * p_std + p_mean)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    return t, torch.where(torch.rand(n, device=device) < ratio, r, t)


def meanflow_target(u_fn, z, t, r, v_g):
    """sg(v_g - (t - r) du/dt): du/dt is the JVP of u_fn at (z, t, r) along (v_g, 1, 0), computed without a graph
    (no_grad) and with SDPA's math kernel, the one that supports forward-mode AD."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, dudt = torch.func.jvp(u_fn, (z, t, r), (v_g, torch.ones_like(t), torch.zeros_like(r)))
    return v_g - (t - r).clamp(0, 1).view(-1, 1, 1, 1) * dudt


@torch.no_grad()
def guided_velocity(model, z, t, y, v, omega=1.0, kappa=0.0, interval=(0.0, 1.0)):
    """MeanFlow's guidance folded into training: v_g = omega v + kappa u(z,t,t|c) + (1 - omega - kappa) u(z,t,t|null)
    inside the interval (effective scale omega / (1 - kappa)), v outside it and for rows whose label is the null one."""
    if omega == 1.0 and kappa == 0.0:
        return v
    u_c, u_u = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.num_classes)]),
                     align=False)[0].chunk(2)  # at h = 0: the instantaneous velocity
    keep = ((t >= interval[0]) & (t <= interval[1]) & (y != model.num_classes)).view(-1, 1, 1, 1)
    return torch.where(keep, omega * v + kappa * u_c + (1 - omega - kappa) * u_u, v)


def meanflow_loss(model, x, y, targets, raw=None, omega=1.0, kappa=0.0, interval=(0.0, 1.0)):
    """MeanFlow loss with REPA/iREPA alignment: {'flow': the adaptively weighted loss, 'align': the alignment loss,
    'mse': the plain mean squared error, for the log (the weighted loss stays near 1 while errors are large)}. `model`
    carries the gradient (the DDP wrapper under torchrun, so gradients are synchronized); `raw` is the bare module for
    the guidance and JVP passes (torch.func.jvp cannot go through DDP). Everything in fp32, as MeanFlow."""
    raw = raw or model
    t, r = sample_tr(x.shape[0], x.device, MEANFLOW['p_mean'], MEANFLOW['p_std'], MEANFLOW['ratio'])
    noise = torch.randn_like(x)
    z, v = interpolate(x, noise, t), noise - x
    y = torch.where(torch.rand(y.shape, device=y.device) < MEANFLOW['label_drop'], raw.num_classes, y)  # in the loss
    v_g = guided_velocity(raw, z, t, y, v, omega, kappa, interval)
    u_tgt = meanflow_target(lambda z_, t_, r_: raw(z_, t_, y, align=False, r=r_)[0], z, t, r, v_g)
    u, zs = model(z, t, y, r=r, align=bool(targets))  # the gradient-carrying pass; its hidden state is aligned
    err = (u.float() - u_tgt).square().sum((1, 2, 3))  # per image, summed over pixels
    loss = (err / (err.detach() + MEANFLOW['norm_c']) ** MEANFLOW['norm_p']).mean()  # adaptive weight 1 / sg(L + c)^p
    return dict(flow=loss, align=alignment_loss(zs, targets).to(x.device), mse=err.detach().mean() / u[0].numel())


# -----------------------------------------------------------------------------
# Samplers: Euler / Heun ODE and Euler-Maruyama SDE, t from 1 to 0, state in float64 (as the official code)


@torch.no_grad()
def sample(model, noise, y, mode='sde', num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
           generator=None):
    """Generate latents from `noise` (t = 1) with labels y. mode: 'euler', 'heun' (ODE), 'sde' (Euler-Maruyama) or
    'meanflow' (average-velocity jumps; MeanFlow models).

    Classifier-free guidance acts on all channels, only while guidance_low <= t <= guidance_high, with the cond and
    uncond halves in one batch. The SDE uses w(t) = 2t on the grid linspace(1, 0.04, num_steps) and a last,
    deterministic step to 0; its noise comes from `generator` (float64 draws, one per stochastic step).
    """
    if model.training:
        raise ValueError("sample with the model in eval mode (the EMA model): train mode drops labels at random")
    if mode not in ('euler', 'heun', 'sde', 'meanflow'):
        raise ValueError(f"unknown sampler {mode!r}; accepted: 'euler', 'heun', 'sde', 'meanflow'")
    dtype, device = noise.dtype, noise.device
    y_null = torch.full_like(y, model.num_classes)

    def velocity(x, t, guided, r=None):  # x (B, C, H, W) float64, t a python float -> (B, C, H, W) float64
        if guided:  # cond and uncond in one batch
            x, yy = torch.cat([x, x]), torch.cat([y, y_null])
        else:
            yy = y
        t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=device).to(dtype)
        kw = {} if r is None else dict(r=torch.full_like(t_in, r))  # MeanFlow: the average velocity over [r, t]
        v = model(x.to(dtype), t_in, yy, align=False, **kw)[0].double()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return v

    def guided(t):
        return cfg_scale > 1.0 and guidance_low <= t <= guidance_high

    x = noise.double()
    if mode == 'meanflow':  # z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid: num_steps = 1 is one-step generation
        ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        for t, r in zip(ts[:-1], ts[1:]):
            x = x - (t - r) * velocity(x, t, guided(t), r)
        return x.to(dtype)
    if mode in ('euler', 'heun'):
        ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            d = velocity(x, t, guided(t))
            x_next = x + (t_next - t) * d
            if mode == 'heun' and i < num_steps - 1:  # 2nd-order correction, skipped on the last step
                x_next = x + (t_next - t) * 0.5 * (d + velocity(x_next, t_next, guided(t)))
            x = x_next
        return x.to(dtype)

    def drift(x, t):  # SDE drift d = v - 1/2 w(t) score, score from the velocity on the linear path
        v = velocity(x, t, guided(t))  # guidance on v equals guidance on the drift: the drift is affine in v
        score = ((t - 1) * v - x) / t
        return v - 0.5 * (2 * t) * score

    ts = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]).tolist()
    for t, t_next in zip(ts[:-2], ts[1:-1]):
        dt = t_next - t
        eps = torch.randn(x.shape, dtype=torch.float64, generator=generator, device=device if generator is None else generator.device).to(device)
        x = x + drift(x, t) * dt + math.sqrt(2 * t) * math.sqrt(abs(dt)) * eps
    t, t_next = ts[-2], ts[-1]
    return (x + drift(x, t) * (t_next - t)).to(dtype)  # last step: the mean, no noise


# -----------------------------------------------------------------------------
# Spatial-structure metrics of patch tokens (the paper's predictors of FID), vectorised over the batch


@torch.no_grad()
def spatial_metrics(feats, masks=None, far_dist=6, dmax=8, d_pos=1, d_neg=6):
    """Per-image LDS, CDS, SRSS and RMSC of tokens (B, T, D) on a square, row-major grid; returns a dict of (B,) tensors.

    K is the cosine similarity of two tokens, d their Manhattan distance on the grid.
    LDS  = mean K over 4-neighbours - mean K over pairs with d >= far_dist.
    CDS  = -slope of the least-squares line through (d, mean K at distance d), d = 1..dmax.
    SRSS = mean over foreground anchors of [mean K to foreground tokens at d <= d_pos - mean K to background tokens at
           d >= d_neg]; NaN without masks, with < 2 foreground or no background tokens (average it with nanmean).
    RMSC = sqrt(mean over tokens of |x - mean_T x|^2) for the L2-normalized tokens x; in [0, 1].
    """
    if feats.dim() != 3:
        raise ValueError(f"feats must be (B, T, D) tokens, got shape {tuple(feats.shape)}")
    B, T, _ = feats.shape
    H = math.isqrt(T)
    if H * H != T:
        raise ValueError(f"the tokens must lie on a square grid, got T={T} (not a square number)")
    if masks is not None and tuple(masks.shape) != (B, T):
        raise ValueError(f"masks must be (B, T) = {(B, T)} foreground flags, one per token; got {tuple(masks.shape)}")
    u = F.normalize(feats.float(), dim=-1, eps=1e-8)
    K = u @ u.transpose(1, 2)  # (B, T, T)
    rc = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing='ij'), -1).view(T, 2).to(feats.device)
    dist = (rc[:, None] - rc[None]).abs().sum(-1)  # (T, T) Manhattan distance
    g = u.view(B, H, H, -1)  # (B, H, W, D)
    local = torch.cat([(g[:, 1:] * g[:, :-1]).sum(-1).flatten(1), (g[:, :, 1:] * g[:, :, :-1]).sum(-1).flatten(1)], 1)
    far = dist >= far_dist
    out = {'lds': local.mean(1) - K.masked_fill(~far, 0).sum((1, 2)) / far.sum().clamp(min=1)}
    ds = [d for d in range(1, dmax + 1) if (dist == d).any()]
    S = torch.stack([K[:, dist == d].mean(1) for d in ds], 1)  # (B, len(ds)) mean similarity at each distance
    x0 = torch.tensor(ds, dtype=S.dtype, device=S.device)
    x0 = x0 - x0.mean()
    out['cds'] = -((S - S.mean(1, keepdim=True)) @ x0) / (x0 @ x0).clamp(min=1e-12)
    if masks is None:
        out['srss'] = torch.full((B,), float('nan'), device=feats.device)
    else:
        fg = masks.bool().to(feats.device)  # (B, T)
        pos = fg[:, :, None] & fg[:, None, :] & ((dist >= 1) & (dist <= d_pos))  # (B, T, T) anchor FG, partner FG, near
        neg = fg[:, :, None] & ~fg[:, None, :] & (dist >= d_neg)  # anchor FG, partner BG, far
        n_pos, n_neg = pos.sum(2), neg.sum(2)  # (B, T)
        delta = (K * pos).sum(2) / n_pos.clamp(min=1) - (K * neg).sum(2) / n_neg.clamp(min=1)
        valid = fg & (n_pos > 0) & (n_neg > 0)
        srss = (delta * valid).sum(1) / valid.sum(1)  # 0/0 = NaN when no anchor qualifies
        out['srss'] = srss.masked_fill((fg.sum(1) < 2) | ((~fg).sum(1) < 1), float('nan'))
    out['rmsc'] = (u - u.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()
    return out


# -----------------------------------------------------------------------------
# Data: the built-in synthetic set, an ImageNet-style folder, prepared VAE latents
# Every source yields (image uint8 (3, R, R) for the teacher, VAE moments (2C, h, w) or an empty tensor, label).

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


def synthetic_image(index, resolution, num_classes, seed=0):
    """Image `index` of the built-in set: one coloured shape on a striped, two-colour background, and its mask.

    The class fixes the shape (disc, square, triangle, ring, cross) and the hue; position, size, background and
    stripes vary per image. Deterministic in (seed, index), so no file is needed and every rank sees the same set.
    """
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    yy, xx = (np.mgrid[0:resolution, 0:resolution] + 0.5) / resolution  # (R, R) pixel centres in (0, 1)
    c0, c1 = rng.uniform(0.05, 0.6, size=(2, 3))
    angle, freq = rng.uniform(0, np.pi), rng.uniform(1.5, 6)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    img = c0 + (c1 - c0) * (0.6 * yy + 0.4 * stripes)[..., None]  # (R, R, 3)
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    r = rng.uniform(0.15, 0.3)
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    shape = label % 5
    if shape == 0:
        mask = dx ** 2 + dy ** 2 < r ** 2
    elif shape == 1:
        mask = np.maximum(dx, dy) < 0.8 * r
    elif shape == 2:
        mask = (yy - cy > -r) & (yy - cy < r) & (dx < (yy - cy + r) / 2)
    elif shape == 3:
        mask = (dx ** 2 + dy ** 2 < r ** 2) & (dx ** 2 + dy ** 2 > (0.55 * r) ** 2)
    else:
        mask = ((dx < r / 3) & (dy < r)) | ((dy < r / 3) & (dx < r))
    hue = (label / num_classes + rng.uniform(-0.2, 0.2) / num_classes) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    shade = 0.8 + 0.2 * (1 - np.clip(np.hypot(xx - cx + r / 3, yy - cy + r / 3) / (2 * r), 0, 1))  # lit from top left
    img[mask] = colour * shade[mask, None]
    return (img * 255).round().clip(0, 255).astype(np.uint8), label, mask  # (R, R, 3) uint8, int, (R, R) bool


def center_crop(pil_image, resolution):
    """ADM's center crop: halve with a box filter while possible, bicubic resize of the short side, crop the centre."""
    while min(*pil_image.size) >= 2 * resolution:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = resolution / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top: top + resolution, left: left + resolution]


def list_image_folder(root):
    """ImageNet layout: root/<class>/*.JPEG (or root/train/<class>/...). Returns (root, files, labels, class names)."""
    root = Path(root)
    if (root / 'train').is_dir():
        root = root / 'train'
    if not root.is_dir():
        raise FileNotFoundError(f"--data-path {root} is not a folder; expected <root>/<class>/*.JPEG or a prepared latents folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for label, c in enumerate(classes):
        for f in sorted((root / c).rglob('*')):
            if f.suffix.lower() in IMAGE_EXTS:
                files.append(str(f.relative_to(root)))
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in class folders under {root}; "
                                f"expected the ImageNet layout <root>/<class>/<image>")
    return root, files, labels, classes


class ImageData(torch.utils.data.Dataset):
    """Images (synthetic or from a folder) at one resolution, optionally paired by index with prepared latents."""
    def __init__(self, data_path, resolution, num_classes=10, seed=0, synthetic_size=10_000):
        self.resolution, self.latents, self.stats, self.bad = resolution, None, None, 0
        data_path = Path(data_path) if data_path else None
        if data_path and (data_path / 'meta.json').exists():  # prepared latents: read the source they were made from
            meta = json.loads((data_path / 'meta.json').read_text())
            if meta['resolution'] != resolution:
                raise ValueError(f"{data_path} holds latents of {meta['resolution']} px images; pass --resolution {meta['resolution']}")
            self.latents = np.load(data_path / 'latents.npy', mmap_mode='r')  # (N, 2C, h, w) fp16: posterior mean, std
            self.stats, self.vae = meta['stats'], meta['vae']
            data_path = Path(meta['source']) if meta['source'] != 'synthetic' else None
            num_classes, seed, synthetic_size = meta['num_classes'], meta['seed'], meta['size']
        if data_path is None:
            self.root, self.files, self.num_classes, self.seed = None, None, num_classes, seed
            self.labels = np.arange(synthetic_size) % num_classes
        else:
            self.root, self.files, labels, classes = list_image_folder(data_path)
            self.labels, self.num_classes = np.array(labels), len(classes)
        if self.latents is not None and len(self.latents) != len(self.labels):
            raise ValueError(f"prepared latents hold {len(self.latents)} images but the source has {len(self.labels)}; run --prepare again")

    def __len__(self):
        return len(self.labels)

    def image(self, i):
        if self.files is None:
            return synthetic_image(i, self.resolution, self.num_classes, self.seed)[0]
        for j in range(len(self.files)):  # a corrupt file is replaced by the next readable one of its class
            if self.labels[(i + j) % len(self.files)] != self.labels[i]:
                continue
            path = self.root / self.files[(i + j) % len(self.files)]
            try:
                with Image.open(path) as im:
                    return center_crop(im.convert('RGB'), self.resolution)
            except (OSError, ValueError, SyntaxError) as e:
                self.bad += 1
                print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e}); "
                      f"{self.bad} skipped so far by this worker", file=sys.stderr)
        raise RuntimeError(f"no readable image of class {self.labels[i]} under {self.root}")

    def __getitem__(self, i):
        img = torch.from_numpy(np.ascontiguousarray(self.image(i))).permute(2, 0, 1)  # (3, R, R) uint8
        moments = torch.from_numpy(np.array(self.latents[i])) if self.latents is not None else torch.empty(0)
        return img, moments, int(self.labels[i])


class Batches(torch.utils.data.Sampler):
    """This rank's share of each global batch, from step `start` on, forever.

    Epoch e is a permutation seeded with seed + e and drops its last partial batch, so the data position is just the
    step number: resuming at step k reproduces the same batches on any number of workers.
    """
    def __init__(self, n, global_batch, rank, world, seed, start=0):
        if n < global_batch:
            raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.local = n, global_batch, global_batch // world
        self.rank, self.seed, self.start, self.per_epoch = rank, seed, start, n // global_batch

    def __iter__(self):
        step, perm_epoch, perm = self.start, None, None
        while True:
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
            lo = k * self.global_batch + self.rank * self.local
            yield perm[lo: lo + self.local].tolist()
            step += 1


def dist_info():
    """(rank, world size, local rank): from torchrun's environment, or a single process without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))
    return 0, 1, 0


def moment_sums(mean, std):
    """Posterior (B, C, h, w) mean and std -> (3, C) float64 sums of mu, mu^2 + sigma^2 and the count."""
    mean, std = mean.double(), std.double()
    return torch.stack([mean.sum((0, 2, 3)), (mean ** 2 + std ** 2).sum((0, 2, 3)),
                        torch.full_like(mean[0, :, 0, 0], mean[:, 0].numel())])


def latent_stats(sums):
    """Per-channel mean and std of posterior samples z = mu + sigma eps: E[z] = E[mu], Var z = E[mu^2 + sigma^2] - E[mu]^2."""
    mean = sums[0] / sums[2]
    return mean, (sums[1] / sums[2] - mean ** 2).sqrt()


@torch.no_grad()
def prepare_latents(data_path, out_dir, resolution, vae_spec, device, num_classes=10, seed=0, synthetic_size=10_000,
                    batch_size=64, num_workers=0):
    """One pass over the images (sharded over ranks): VAE posterior mean/std as an fp16 memmap, labels, and the
    per-channel latent statistics (latent_stats). meta.json is written last and marks completion."""
    import encoders
    rank, world, _ = dist_info()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = ImageData(data_path, resolution, num_classes, seed, synthetic_size)
    vae = encoders.load_vae(vae_spec, device=device)
    C, h = vae.latent_channels, resolution // vae.downsample
    if rank == 0:
        np.lib.format.open_memmap(out / 'latents.npy', mode='w+', dtype=np.float16, shape=(len(data), 2 * C, h, h)).flush()
    if world > 1:
        dist.barrier()
    latents = np.load(out / 'latents.npy', mmap_mode='r+')
    mine = list(range(rank, len(data), world))
    chunks = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=chunks, num_workers=num_workers)
    sums = torch.zeros(3, C, dtype=torch.float64, device=device)
    for ids, (img, _, _) in zip(chunks, tqdm(loader, desc='prepare latents', disable=rank != 0)):
        mean, std = vae.encode(img.to(device).float() / 127.5 - 1)  # (B, C, h, w) each
        latents[ids] = torch.cat([mean, std], 1).half().cpu().numpy()
        sums += moment_sums(mean, std)
    latents.flush()
    if world > 1:
        dist.all_reduce(sums)
        dist.barrier()
    if rank == 0:
        mu, sd = latent_stats(sums)
        np.save(out / 'labels.npy', data.labels.astype(np.int64))
        meta = dict(source=str(Path(data_path).resolve()) if data_path else 'synthetic', resolution=resolution,
                    num_classes=data.num_classes, seed=seed, size=len(data), vae=vae_spec, shape=[2 * C, h, h],
                    stats=dict(mean=mu.tolist(), std=sd.tolist()))
        (out / 'meta.json').write_text(json.dumps(meta, indent=1))
        print(f"prepared {len(data)} latents {tuple(meta['shape'])} in {out}; per-channel mean {np.round(meta['stats']['mean'], 4).tolist()}, "
              f"std {np.round(meta['stats']['std'], 4).tolist()}")
    if world > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# Training: one loop for one CPU, one GPU or many (torchrun); checkpoints that resume the exact trajectory

# dense bf16 FLOP/s per GPU, matched in order against torch.cuda.get_device_name(): specific names first
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200': 989e12, 'H800': 989e12,
                   'GH200': 989e12, 'B200': 2250e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12, 'RTX 4090': 165e12}
RESUME_MAY_CHANGE = {'max_steps', 'log_every', 'ckpt_every', 'sample_every', 'resume', 'device', 'compile',
                     'num_workers', 'out_dir', 'data_path', 'encoder_weights', 'demo', 'prepare'}


def sit_train_flops(model):
    """Training FLOPs per image, 6 (12 L D^2 T + 2 L T^2 D): the token-wise matmuls and attention, x3 for backward."""
    L, (_, T, D) = len(model.blocks), model.pos_embed.shape
    return 6 * (12 * L * D * D * T + 2 * L * T * T * D)


def teacher_flops(teacher):
    """Forward FLOPs per image of a ViT teacher: 2 (weights of its blocks' matmuls) N + 4 L N^2 D for QK^T and AV,
    N = prefix + grid^2 tokens (DINOv2-B at 224 px: 46 GFLOP); the patch embedding (< 0.5%) is left out."""
    n, blocks = teacher.prefix + teacher.grid ** 2, teacher.model.blocks
    return 2 * sum(q.numel() for q in blocks.parameters() if q.dim() == 2) * n + 4 * len(blocks) * n * n * teacher.dim


def weights_fingerprint(model):
    """A float that equal weights reproduce bit for bit and different weights almost surely do not."""
    return sum(((i + 1) * p.double().sum() + p.double().square().sum()) for i, p in enumerate(model.parameters())).item()


def save_checkpoint(path, state):
    """Write to a temp file, then rename: a kill during the save never corrupts the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(out_dir):
    files = sorted((Path(out_dir) / 'checkpoints').glob('*.pt'))  # zero-padded step names; *.pt.tmp are unfinished
    return files[-1] if files else None


def model_from_checkpoint(path, ema=True, device='cpu'):
    """The SiT of a checkpoint (EMA weights by default) in eval mode, and a dict that describes it.

    Reads checkpoints of irepa.py and of the official iREPA/REPA code. Theirs pickle an argparse Namespace, which is
    allowed through the weights_only load; they do not store the latent normalization, so info['latent'] is None.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(ckpt, dict) or 'ema' not in ckpt or not ('model_args' in ckpt or 'args' in ckpt):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a SiT checkpoint of irepa.py or the official code (it holds {keys})")
    state = ckpt['ema' if ema else 'model']
    if 'model_args' in ckpt:  # ours
        args, info = ckpt['model_args'], dict(config=ckpt['config'], latent=ckpt.get('latent'), step=ckpt['step'],
                                              vae_state=ckpt.get('vae'))  # REPA-E: the VAE trained with the SiT
    else:  # official: rebuild from its training arguments; the projectors are not needed to sample
        a = vars(ckpt['args'])
        args = sit_args(a['model'], input_size=a['resolution'] // 8, num_classes=a.get('num_classes', 1000),
                        encoder_depth=a.get('encoder_depth'), qk_norm=a.get('qk_norm', False), z_dims=())
        state = {k: v for k, v in state.items() if not k.startswith('projectors.')}
        info = dict(config=a, latent=None, step=ckpt.get('steps'))
    model = SiT(**args)
    load_state(model, state)
    return model.to(device).eval(), info


def to_uint8(x):
    """[-1, 1] floats (B, 3, H, W) -> uint8 (B, H, W, 3), rounding to nearest (DESIGN.md)."""
    return (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images, path, cols=None):
    """uint8 (N, H, W, 3) -> one PNG grid; cells smaller than 64 px are enlarged (nearest) so people can see them."""
    k = max(1, 64 // images.shape[1])
    images = images.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)  # (N, kH, kW, 3)
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.zeros(rows * h, cols * w, 3, dtype=torch.uint8)
    for i, im in enumerate(images.cpu()):
        grid[(i // cols) * h: (i // cols + 1) * h, (i % cols) * w: (i % cols + 1) * w] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)


def build_teachers(cfg, grid, device):
    """The frozen teachers (bf16 on GPU). In --demo, unavailable weights fall back to a random 1-block teacher."""
    import encoders
    names = [n for n in cfg['encoder'].split(',') if n and n != 'none']
    weights = cfg['encoder_weights'].split(',')
    if len(weights) not in (1, len(names)):
        raise ValueError(f"--encoder-weights has {len(weights)} entries for {len(names)} teachers; give one or one per teacher")
    teachers = []
    for name, w in zip(names, weights * len(names) if len(weights) == 1 else weights):
        kw = dict(grid=grid, device=device, dtype=torch.bfloat16 if device.type == 'cuda' else None,
                  compile=cfg['compile'], siglip_norm=cfg['siglip_norm'])
        try:
            teachers.append(encoders.load_teacher(name, w, **kw))
        except Exception as e:
            if not (cfg['demo'] and w == 'auto'):
                raise
            print(f"\n{'!' * 80}\n!! --demo: the weights of {name} are not available here ({type(e).__name__}: {e}).\n"
                  f"!! Using a RANDOM 1-block {name} instead: its tokens mean nothing; this only exercises the code path.\n"
                  f"{'!' * 80}\n", file=sys.stderr)
            teachers.append(encoders.load_teacher(name, 'random:1', **kw))
    return teachers


def ema_update(ema, model, decay):
    """fp32 EMA of the parameters and float buffers (REPA-E's latent BatchNorm statistics), one kernel per group."""
    floats = lambda m: [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]
    with torch.no_grad():
        torch._foreach_lerp_(floats(ema), floats(model), 1 - decay)


def train_step(loss_fn, model, ema, opt, proj_coeff, grad_clip, ema_decay, autocast=contextlib.nullcontext()):
    """One optimizer step on loss_fn() = {'flow', 'align', anything else to log}: flow + proj_coeff * align, clipped
    AdamW, EMA. Returns the losses and the gradient norm as device tensors: nothing here waits for the GPU."""
    with autocast:
        losses = loss_fn()
    (losses['flow'] + proj_coeff * losses['align']).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)  # right away: frees the memory, and no gradient outlives its step (REPA-E relies on it)
    ema_update(ema, model, ema_decay)
    return dict({k: v.detach() for k, v in losses.items()}, grad_norm=grad_norm)


# -----------------------------------------------------------------------------
# REPA-E (--repa-e): the VAE trains end to end through the alignment loss (objectives digest §3)

REPAE_LOSS = dict(l1=1.0, lpips=1.0, kl=1e-6, gan=0.1)  # REPA-E's l1_lpips_kl_gan.yaml: the VAE regularizer


def normalize_latents(bn, z):
    """REPA-E's latent BatchNorm (affine off). In eval mode: running statistics, differentiable in z. In train mode:
    batch statistics over all ranks (SyncBN), which update the running ones; z is detached there, so no gradient
    needs to flow through the statistics and this works with any backend (SyncBatchNorm needs a GPU)."""
    if not bn.training:
        return bn(z)
    with torch.no_grad():
        s = torch.stack([z.sum((0, 2, 3)), z.square().sum((0, 2, 3)), torch.full_like(z[0, :, 0, 0], z[:, 0].numel())])
        if dist_info()[1] > 1:
            dist.all_reduce(s)
        mean, n = s[0] / s[2], s[2]
        var = s[1] / n - mean ** 2  # biased, to normalize; the running variance is unbiased, as BatchNorm's
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(var * n / (n - 1), bn.momentum)
        bn.num_batches_tracked += 1
    return (z - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + bn.eps).sqrt()


def kl_loss(mean, std):
    """KL(q(z|x) || N(0, I)) summed over the latent, averaged over images (LDM's DiagonalGaussian.kl)."""
    return 0.5 * (mean.square() + std.square() - 1 - 2 * std.log()).sum((1, 2, 3)).mean()


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def repae_step(c, model, train_model, ema, vae, disc, lpips, opts, img, y, targets, autocast):
    """One REPA-E iteration. (1) VAE: regularizer + vae_align_coeff x alignment through the frozen SiT (eval mode:
    BN running statistics, no label dropout; the gradient reaches z through the trunk and projector). (2) The
    discriminator, hinge loss. (3) The SiT on the detached latent with the same t and noise: flow + proj_coeff x
    alignment. Three optimizers, each clipped. Returns device tensors only."""
    opt, opt_vae, opt_disc = opts
    x = img.float() / 127.5 - 1
    with autocast:
        mean, std, z, recon = vae(x)  # (B, C, h, w) x 3 and (B, 3, R, R); vae may be DDP-wrapped
    t, noise = torch.rand(x.shape[0], device=x.device), torch.randn_like(z)
    model.requires_grad_(False).eval()
    disc.requires_grad_(False)
    lpips_in = (lambda v: v) if c.lpips_quirk else (lambda v: (v + 1) / 2)  # upstream feeds [-1, 1] to a [0, 1] LPIPS
    with autocast:
        zs = model(interpolate(normalize_latents(model.bn, z), noise, t), t, y, align_only=True)[1]
        vae_align = alignment_loss(zs, targets)
        terms = dict(l1=(x - recon.float()).abs().mean(), lpips=lpips(lpips_in(x), lpips_in(recon.float())).mean(),
                     kl=kl_loss(mean.float(), std.float()), gan=-disc(recon).float().mean())
    vae_loss = sum(REPAE_LOSS[k] * v for k, v in terms.items()) + c.vae_align_coeff * vae_align
    vae_loss.backward()
    grad_norm_vae = torch.nn.utils.clip_grad_norm_(vae.parameters(), c.grad_clip)
    opt_vae.step()
    opt_vae.zero_grad(set_to_none=True)
    model.requires_grad_(True).train()
    disc.requires_grad_(True)
    with autocast:
        d_loss = hinge_d_loss(disc(x), disc(recon.detach()).float())  # two forwards: BN statistics per batch, as taming
    d_loss.backward()
    if dist_info()[1] > 1:  # by hand: DDP allows one forward per backward, the discriminator runs twice
        for p in disc.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist_info()[1]
    grad_norm_disc = torch.nn.utils.clip_grad_norm_(disc.parameters(), c.grad_clip)
    opt_disc.step()
    opt_disc.zero_grad(set_to_none=True)
    zn = normalize_latents(model.bn, z.detach())
    sit = train_step(lambda: flow_loss(train_model, zn, y, targets, t, noise), model, ema, opt, c.proj_coeff,
                     c.grad_clip, c.ema_decay, autocast)
    return dict(sit, vae_loss=vae_loss.detach(), vae_align=vae_align.detach(), d_loss=d_loss.detach(),
                grad_norm_vae=grad_norm_vae, grad_norm_disc=grad_norm_disc, **{k: v.detach() for k, v in terms.items()})


def repae_nets(cfg, device):
    """The trainable VAE, the discriminator and LPIPS of --repa-e; in --demo, unavailable LPIPS weights fall back to
    random ones (loudly)."""
    import encoders
    vae = encoders.load_vae(cfg['vae'], device=device)
    disc = encoders.load_discriminator(cfg['disc_weights'], device=device)
    try:
        lpips = encoders.load_lpips(cfg['lpips_weights'], device=device)
    except FileNotFoundError as e:
        if not cfg['demo']:
            raise
        print(f"\n!! --demo: {e}\n!! Using RANDOM LPIPS weights instead.\n", file=sys.stderr)
        lpips = encoders.load_lpips('random', device=device)
    return vae, disc, lpips


# -----------------------------------------------------------------------------
# The training loop


def train(cfg):
    c = SimpleNamespace(**cfg)
    rank, world, local_rank = dist_info()
    master = rank == 0
    device = torch.device(f'cuda:{local_rank}' if c.device == 'cuda' and world > 1 else c.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if c.global_batch_size % world:
        raise ValueError(f"--global-batch-size {c.global_batch_size} is not divisible by the {world} processes")
    out = Path(c.out_dir)
    ckpt = None
    if c.resume:
        path = latest_checkpoint(out)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}; drop --resume to start afresh")
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        diff = {k: (ckpt['config'].get(k), v) for k, v in cfg.items()
                if k not in RESUME_MAY_CHANGE and ckpt['config'].get(k) != v}
        if diff:
            raise ValueError(f"--resume: {path} was made with another config; differing settings (checkpoint, now): {diff}")
        if master:
            print(f"resuming from {path} (step {ckpt['step']})")

    # --- data: latents are prepared once (rank-parallel) and read from a memmap; images feed the teacher.
    # REPA-E trains the VAE, so it encodes images every step instead.
    data = ImageData(c.data_path, c.resolution, c.num_classes, c.seed, c.synthetic_size)
    if c.repa_e and c.meanflow:
        raise ValueError("--repa-e and --meanflow are separate recipes here; pick one")
    if c.repa_e and (c.vae == 'none' or data.latents is not None):
        raise ValueError("--repa-e trains the VAE end to end, so it needs images and a VAE to start from: pass an image "
                         "folder (or nothing: the synthetic set) and --vae (e.g. sd-vae-ft-mse), not prepared latents or "
                         "--vae none")
    if c.vae != 'none' and data.latents is None and not c.repa_e:
        prepared = out / 'latents'
        if not (prepared / 'meta.json').exists():
            if master:
                print(f"no prepared latents: encoding the data once with {c.vae} into {prepared}")
            prepare_latents(c.data_path, prepared, c.resolution, c.vae, device, c.num_classes, c.seed, c.synthetic_size,
                            num_workers=c.num_workers)
        data = ImageData(prepared, c.resolution)
    torch.manual_seed(c.seed)  # the same on every rank: random teachers and networks agree
    vae, disc, lpips = repae_nets(cfg, device) if c.repa_e else (None, None, None)
    latent = data.latents is not None
    if latent:
        shape = tuple(data.latents.shape[1:])
        in_channels, input_size = shape[0] // 2, shape[1]
        if c.latent_scale:  # REPA: z * 0.18215, no shift
            shift, scale = torch.zeros(in_channels), torch.full((in_channels,), c.latent_scale)
        else:  # iREPA: per-channel statistics of the dataset's latents
            shift, scale = torch.tensor(data.stats['mean']), 1 / torch.tensor(data.stats['std'])
        shift, scale = shift.view(1, -1, 1, 1).to(device), scale.view(1, -1, 1, 1).to(device)
    elif c.repa_e:
        in_channels, input_size = vae.latent_channels, c.resolution // vae.downsample
    else:
        in_channels, input_size = 3, c.resolution

    # --- model, teachers, EMA, optimizers
    if c.model not in SiT_models:
        raise ValueError(f"unknown model {c.model!r}; accepted: {', '.join(SiT_models)}")
    grid = input_size // int(c.model.split('/')[1])
    teachers = build_teachers(cfg, grid, device)
    model_args = sit_args(c.model, input_size=input_size, in_channels=in_channels, num_classes=data.num_classes,
                          encoder_depth=c.encoder_depth, z_dims=[t.dim for t in teachers], projector=c.projector,
                          proj_kernel=c.proj_kernel, projector_dim=c.projector_dim, qk_norm=c.qk_norm, latent_bn=c.repa_e,
                          meanflow=c.meanflow)
    model = SiT(**model_args).to(device)
    adamw = lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, c.adam_beta2), weight_decay=0, eps=1e-8,
                                                 fused=True)  # one kernel for all tensors, on CUDA and CPU alike
    opt = adamw(model.parameters(), c.lr)
    if c.repa_e:
        opts = (opt, adamw(vae.parameters(), c.vae_lr), adamw(disc.parameters(), c.disc_lr))
    start = 0
    if ckpt is not None:
        load_state(model, ckpt['model'])
        opt.load_state_dict(ckpt['opt'])
        start = ckpt['step']
        if c.repa_e:
            load_state(vae, ckpt['vae'], 'checkpoint (VAE)')
            load_state(disc, ckpt['disc'], 'checkpoint (discriminator)')
            opts[1].load_state_dict(ckpt['opt_vae'])
            opts[2].load_state_dict(ckpt['opt_disc'])
    elif c.repa_e:  # the latent BatchNorm starts from the statistics of the initial VAE's latents (REPA-E's stats file)
        ids = list(range(rank, min(len(data), c.repae_stats_images), world))
        sums = 0
        with torch.no_grad():
            for i in range(0, len(ids), 64):
                img = torch.stack([data[j][0] for j in ids[i: i + 64]]).to(device)
                sums = sums + moment_sums(*vae.encode(img.float() / 127.5 - 1))
        if world > 1:
            dist.all_reduce(sums)
        mean, std = latent_stats(sums)
        model.bn.running_mean.copy_(mean)
        model.bn.running_var.copy_(std ** 2)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if ckpt is not None:
        load_state(ema, ckpt['ema'])
    torch.manual_seed(c.seed * world + rank)  # a different stream of t, noise and label dropout per rank
    if ckpt is not None:
        rng = ckpt['rng'][rank] if len(ckpt['rng']) == world else None
        if rng is None:
            print(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, now {world}: "
                  f"new random streams, the trajectory will differ from an uninterrupted run", file=sys.stderr)
        else:
            torch.set_rng_state(rng['cpu'])
            if device.type == 'cuda' and 'cuda' in rng:
                torch.cuda.set_rng_state(rng['cuda'])
    train_model, train_vae = model, vae
    if world > 1:
        ids = [local_rank] if device.type == 'cuda' else None
        train_model = DDP(model, device_ids=ids)
        train_vae = DDP(vae, device_ids=ids) if c.repa_e else None
    if c.compile:
        train_model = torch.compile(train_model)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()

    def latent_info():  # how to turn model outputs back into images; stored in every checkpoint for fid.py sample
        if c.repa_e:  # the trained VAE and the EMA of the BatchNorm statistics (REPA-E denormalizes without its eps)
            return dict(vae='checkpoint', vae_args=vae.args, shift=ema.bn.running_mean.tolist(),
                        scale=ema.bn.running_var.rsqrt().tolist())
        return dict(vae=data.vae, shift=shift.flatten().tolist(), scale=scale.flatten().tolist()) if latent else None

    def decode(z):  # model space -> images in [-1, 1]
        nonlocal vae
        info = latent_info()
        if info is None:
            return z
        if vae is None:
            import encoders
            vae = encoders.load_vae(data.vae, device=device)
        return vae.decode(z / torch.tensor(info['scale'], device=device).view(1, -1, 1, 1)
                          + torch.tensor(info['shift'], device=device).view(1, -1, 1, 1))

    @torch.no_grad()
    def sample_images(path):
        g = torch.Generator().manual_seed(c.seed)  # the same noise and labels at every step: grids are comparable
        n = 16
        noise = torch.randn(n, in_channels, input_size, input_size, generator=g).to(device)
        y = (torch.arange(n) % data.num_classes).to(device)
        with autocast:
            z = sample(ema, noise, y, c.sample_mode, c.sample_steps, c.cfg_scale, c.guidance_low, c.guidance_high, g)
            save_grid(to_uint8(decode(z.float())), path, cols=8)

    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'config.json').write_text(json.dumps(cfg, indent=1))
        n_params = sum(p.numel() for p in model.parameters())
        what = ('latents ' + str(tuple(data.latents.shape[1:])) if latent else
                f'REPA-E latents {(in_channels, input_size, input_size)}' if c.repa_e else 'pixels')
        print(f"{c.model}: {n_params / 1e6:.2f}M parameters (projectors included), {grid}x{grid} tokens, {what}, "
              f"{len(data)} images, {data.num_classes} classes, teachers: {', '.join(t.name for t in teachers) or 'none'}")

    # --- the loop
    batches = Batches(len(data), c.global_batch_size, rank, world, c.seed, start)
    loader = iter(torch.utils.data.DataLoader(
        data, batch_sampler=batches, num_workers=c.num_workers, pin_memory=device.type == 'cuda',
        persistent_workers=c.num_workers > 0, generator=torch.Generator()))  # own generator: leaves the train RNG alone
    flops = sit_train_flops(model) + sum(teacher_flops(t) for t in teachers)  # per image, for the MFU
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == 'cuda' else None
    sums, n_steps = {}, 0  # losses summed on the device, read at log steps only
    first_bad = torch.tensor(-1, device=device)
    log = open(out / 'log.jsonl', 'a') if master else None
    bar = tqdm(total=c.max_steps, initial=start, disable=not master, desc='train', dynamic_ncols=True)
    t0, first = time.time(), None
    for step in range(start, c.max_steps):
        img, moments, y = next(loader)  # uint8 (B, 3, R, R), fp16 (B, 2C, h, w) or empty, (B,)
        img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad(), autocast:
            targets = teacher_targets([t(img.float() / 255) for t in teachers], c.spnorm, c.spnorm_gamma)
        if c.repa_e:
            stats = repae_step(c, model, train_model, ema, train_vae, disc, lpips, opts, img, y, targets, autocast)
        else:
            if latent:  # a fresh posterior sample every step, then per-channel normalization
                mean, std = moments.to(device, non_blocking=True).float().chunk(2, dim=1)
                x = (mean + std * torch.randn_like(std) - shift) * scale
            else:
                x = img.float() / 127.5 - 1
            if c.meanflow:  # fp32, as MeanFlow; the JVP and guidance passes use the bare module
                loss_fn = partial(meanflow_loss, train_model, x, y, targets, raw=model, omega=c.mf_omega,
                                  kappa=c.mf_kappa, interval=(c.mf_t_start, c.mf_t_end))
            else:
                loss_fn = partial(flow_loss, train_model, x, y, targets)
            stats = train_step(loss_fn, model, ema, opt, c.proj_coeff, c.grad_clip, c.ema_decay,
                               contextlib.nullcontext() if c.meanflow else autocast)
        sums = {k: sums.get(k, 0) + v.float() for k, v in stats.items()}
        n_steps += 1
        loss = sum(v for k, v in stats.items() if not k.startswith('grad_norm'))
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
        bar.update(1)

        done = step + 1
        last = done == c.max_steps
        do_ckpt, do_sample = done % c.ckpt_every == 0 or last, done % c.sample_every == 0 or last
        if done % c.log_every == 0 or do_ckpt or do_sample:  # the only host syncs: here, every log_every steps
            names = list(sums)
            vec = torch.stack([sums[k] for k in names] + [first_bad.float()])
            if world > 1:
                dist.all_reduce(vec[:-1])
                dist.all_reduce(vec[-1:], op=dist.ReduceOp.MAX)
            vec = vec.tolist()
            if vec[-1] >= 0:
                good = latest_checkpoint(out)
                raise FloatingPointError(f"non-finite loss at step {int(vec[-1])}; stopping. The last good checkpoint is "
                                         f"{good or 'none'}; resume from it with --resume (maybe with --qk-norm or a lower --lr)")
            dt, t0 = time.time() - t0, time.time()
            rec = dict(step=done, **{k: v / (n_steps * world) for k, v in zip(names, vec)},
                       img_per_s=n_steps * c.global_batch_size / dt, steps_per_s=n_steps / dt)
            rec['peak_mem_gb'] = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
            if peak:
                rec['mfu'] = rec['img_per_s'] / world * flops / peak
            first = first or rec
            sums, n_steps = {}, 0
            if master:
                log.write(json.dumps(rec) + '\n')
                log.flush()
                bar.set_postfix(**{k: f"{rec[k]:.4f}" for k in ('flow', 'mse', 'align') if k in rec},
                                img_s=f"{rec['img_per_s']:.1f}")
        if do_ckpt:
            if world > 1:  # DDP keeps replicas equal; check it before saving rank 0's copy as everyone's
                prints = [None] * world
                dist.all_gather_object(prints, weights_fingerprint(model))
                if len(set(prints)) > 1:
                    raise RuntimeError(f"step {done}: the {world} ranks hold different weights {prints}")
            rngs = [None] * world
            mine = dict(cpu=torch.get_rng_state(), **({'cuda': torch.cuda.get_rng_state(device)} if device.type == 'cuda' else {}))
            if world > 1:
                dist.all_gather_object(rngs, mine)
            else:
                rngs = [mine]
            if master:
                state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=done, config=cfg,
                             model_args=model_args, rng=rngs, data=dict(images_seen=done * c.global_batch_size),
                             latent=latent_info())
                if c.repa_e:
                    state.update(vae=vae.state_dict(), disc=disc.state_dict(), opt_vae=opts[1].state_dict(),
                                 opt_disc=opts[2].state_dict())
                save_checkpoint(out / 'checkpoints' / f'{done:07d}.pt', state)
        if do_sample and master:
            sample_images(out / 'samples' / f'{done:07d}.png')
    bar.close()
    if master:
        log.close()
        if c.max_steps > start:
            key = 'mse' if c.meanflow else 'flow'  # MeanFlow's weighted loss stays near 1; its plain error is telling
            print(f"done: {c.max_steps} steps; {key} loss {first[key]:.4f} (first log) -> {rec[key]:.4f} (last), "
                  f"alignment {rec['align']:.4f}; checkpoint {latest_checkpoint(out)}, samples in {out / 'samples'}"
                  + (f"; the {world} ranks hold identical weights" if world > 1 else ''))
    return model, ema, opt


# -----------------------------------------------------------------------------
# The paper's study: spatial metrics and linear probe of a teacher, their correlation with FID, the spatial-norm picture


def patch_masks(masks, grid):
    """Pixel masks (B, R, R) -> token masks (B, grid*grid): a patch is foreground if any of its pixels is (official)."""
    return F.max_pool2d(masks[:, None].float(), masks.shape[-1] // grid).flatten(1).bool()  # row-major


def image_mask(data, i, masks_dir):
    """Foreground mask (R, R) of image i: the synthetic set knows its shapes; a folder needs masks_dir/<same path>.png."""
    if data.files is None:
        return synthetic_image(i, data.resolution, data.num_classes, data.seed)[2]
    rel = Path(data.files[i]).with_suffix('.png')
    for p in (Path(masks_dir) / rel, Path(masks_dir) / rel.name):
        if p.exists():
            with Image.open(p) as m:
                return center_crop(m.convert('L'), data.resolution) > 0
    raise FileNotFoundError(f"no mask for {data.files[i]}: expected {Path(masks_dir) / rel} (any mode, > 0 = foreground)")


def linear_probe(feats, labels, steps=200, val_frac=0.2, seed=0):
    """Held-out accuracy of a logistic regression (standardized features, L-BFGS, L2 1e-4) on (N, D) features."""
    n = len(feats)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, tr = perm[:max(1, int(n * val_frac))], perm[max(1, int(n * val_frac)):]
    x = feats.double()
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    num_classes = int(labels.max()) + 1
    lin = nn.Linear(x.shape[1], num_classes).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, history_size=10, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x[tr]), labels[tr]) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return (lin(x[val]).argmax(1) == labels[val]).double().mean().item()


def measure_teacher(argv):
    """python irepa.py metrics --encoder dinov2 [--data-path DIR --masks DIR]: LDS, CDS, SRSS, RMSC and LP accuracy."""
    import encoders
    p = argparse.ArgumentParser(prog='irepa.py metrics', description=measure_teacher.__doc__)
    p.add_argument('--encoder', required=True)
    p.add_argument('--encoder-weights', default='auto')
    p.add_argument('--data-path', default=None, help='image folder (<root>/<class>/*); default: the synthetic set')
    p.add_argument('--masks', default=None, help='folder of foreground masks, same relative paths as the images (.png)')
    p.add_argument('--resolution', type=int, default=256)
    p.add_argument('--grid', type=int, default=None, help='token grid of the teacher; default resolution / 16 (the SiT grid)')
    p.add_argument('--num-images', type=int, default=1000)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--synthetic-size', type=int, default=10_000)
    p.add_argument('--lp-steps', type=int, default=200, help='L-BFGS iterations of the linear probe (0: no probe)')
    p.add_argument('--siglip-norm', choices=['imagenet', 'siglip'], default='imagenet')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out-dir', default='out/metrics', help='features are cached here, the summary written as <teacher>.json')
    a = p.parse_args(argv)
    device = torch.device(a.device)
    grid = a.grid or a.resolution // 16
    data = ImageData(a.data_path, a.resolution, a.num_classes, a.seed, a.synthetic_size)
    n = min(a.num_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(a.seed))[:n].sort().values.tolist()
    name = encoders.resolve_teacher(a.encoder)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = str(Path(a.data_path).resolve()) if a.data_path else f'synthetic-{a.num_classes}-{a.seed}'
    key = f"{name}|{a.encoder_weights}|{source}|{a.resolution}|{grid}|{n}|{a.seed}|{a.siglip_norm}"
    cache = out / f"{name}-{int.from_bytes(key.encode(), 'little') % 10 ** 10:010d}.pt"
    t0 = time.time()
    if cache.exists():
        feats = torch.load(cache, map_location='cpu', weights_only=True)['feats']
        print(f"features from the cache {cache}")
        extract_rate = None
    else:
        torch.manual_seed(a.seed)  # a random teacher (tests) is then the same one every run
        teacher = encoders.load_teacher(name, a.encoder_weights, grid, device,
                                        torch.bfloat16 if device.type == 'cuda' else None, siglip_norm=a.siglip_norm)
        chunks = [idx[i: i + a.batch_size] for i in range(0, n, a.batch_size)]
        loader = torch.utils.data.DataLoader(data, batch_sampler=chunks, num_workers=min(4, os.cpu_count() or 1))
        feats = torch.cat([teacher(img.to(device).float() / 255).half().cpu()
                           for img, _, _ in tqdm(loader, desc=f'{name} tokens', total=len(chunks))])  # (n, T, D)
        extract_rate = n / (time.time() - t0)
        save_checkpoint(cache, dict(feats=feats, key=key))
    masks = None
    if a.masks or data.files is None:
        masks = patch_masks(torch.from_numpy(np.stack([image_mask(data, i, a.masks) for i in idx])), grid)
        few = (masks.sum(1) < grid * grid // 4) | ((~masks).sum(1) < grid * grid // 4)
        masks[few] = False  # SRSS only where a quarter of the patches are foreground and a quarter background (64/64 at 16x16)
    t1 = time.time()
    per = {k: torch.cat(v) for k, v in zip(('lds', 'cds', 'srss', 'rmsc'), zip(*[
        spatial_metrics(feats[i: i + 64].to(device), None if masks is None else masks[i: i + 64].to(device)).values()
        for i in range(0, n, 64)]))}
    metric_rate = n / (time.time() - t1)
    labels = torch.as_tensor(data.labels[idx])
    lp = linear_probe(feats.float().mean(1), labels, a.lp_steps, seed=a.seed) \
        if a.lp_steps and len(labels.unique()) > 1 else None
    summary = dict(teacher=name, images=n, resolution=a.resolution, grid=grid, lp=lp,
                   extract_img_per_s=extract_rate, metrics_img_per_s=metric_rate)
    for k, v in per.items():
        v = v.cpu().double()
        ok = v[~v.isnan()]
        summary[k] = ok.mean().item() if len(ok) else float('nan')
        summary[k + '_std'] = ok.std().item() if len(ok) > 1 else float('nan')
        summary[k + '_n'] = len(ok)
    (out / f'{name}.json.tmp').write_text(json.dumps(summary, indent=1))
    os.replace(out / f'{name}.json.tmp', out / f'{name}.json')  # complete or absent: run.sh skips a measured teacher
    print(f"{name}: {n} images at {a.resolution} px, {grid}x{grid} tokens")
    for k in ('lds', 'cds', 'srss', 'rmsc'):
        print(f"  {k.upper():5s} {summary[k]:+.4f} +- {summary[k + '_std']:.4f}  ({summary[k + '_n']} images)")
    print(f"  LP    {'n/a (one class)' if lp is None else f'{lp:.4f}'}")
    print(f"  speed: tokens {'cached' if extract_rate is None else f'{extract_rate:.1f} img/s'}, metrics {metric_rate:.1f} img/s; "
          f"summary in {out / (name + '.json')}")
    return summary


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def correlate(argv):
    """python irepa.py correlate results.csv: Pearson and Spearman r of LP, LDS, CDS, SRSS, RMSC with FID, and the panel."""
    from scipy import stats
    p = argparse.ArgumentParser(prog='irepa.py correlate', description=correlate.__doc__)
    p.add_argument('csv', help='columns teacher, fid, lp, lds, cds, srss, rmsc (any case, any order, more allowed)')
    p.add_argument('--out', default=None, help='scatter panel PNG (default: next to the CSV)')
    a = p.parse_args(argv)
    import csv
    with open(a.csv, newline='') as f:
        rows = [{k.strip().lower(): v for k, v in r.items() if k} for r in csv.DictReader(f)]
    need = ['teacher', 'fid', 'lp', 'lds', 'cds', 'srss', 'rmsc']
    missing = [c for c in need if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{a.csv} lacks the column(s) {', '.join(missing)}; it needs {', '.join(need)}")
    if len(rows) < 3:
        raise ValueError(f"{a.csv} has {len(rows)} row(s); a correlation needs at least 3 teachers")
    num = lambda v: float(v) if v.strip() not in ('', 'nan', 'NaN', 'None') else float('nan')
    fid = np.array([num(r['fid']) for r in rows])
    result = {}
    print(f"{len(rows)} teachers; correlation with FID (rows with a missing value are left out of that measure)")
    print(f"  {'measure':8s} {'Pearson r':>10s} {'Spearman r':>11s} {'n':>4s}")
    for m in need[2:]:
        x = np.array([num(r[m]) for r in rows])
        ok = np.isfinite(x) & np.isfinite(fid)
        if ok.sum() < 3 or np.ptp(x[ok]) == 0:
            result[m] = dict(pearson=float('nan'), spearman=float('nan'), n=int(ok.sum()))
        else:
            result[m] = dict(pearson=float(np.corrcoef(x[ok], fid[ok])[0, 1]),
                             spearman=float(stats.spearmanr(x[ok], fid[ok])[0]), n=int(ok.sum()))
        print(f"  {m.upper():8s} {result[m]['pearson']:+10.3f} {result[m]['spearman']:+11.3f} {result[m]['n']:4d}")
    W, H, pad = 320, 300, 46
    img = Image.new('RGB', (W * 5, H), 'white')
    d, f12, f14 = ImageDraw.Draw(img), font(12), font(15)
    for i, m in enumerate(need[2:]):
        x = np.array([num(r[m]) for r in rows])
        ok = np.isfinite(x) & np.isfinite(fid)
        ox = i * W
        d.rectangle([ox + pad, 30, ox + W - 12, H - pad], outline='black')
        d.text((ox + pad, 8), f"{m.upper()}   r = {result[m]['pearson']:+.3f}", fill='black', font=f14)
        d.text((ox + W // 2 - 10, H - 20), m.upper(), fill='black', font=f12)
        if ok.sum() < 2:
            continue
        (x0, x1), (y0, y1) = [(v.min() - 0.06 * np.ptp(v) - 1e-9, v.max() + 0.06 * np.ptp(v) + 1e-9) for v in (x[ok], fid[ok])]
        px = lambda v: ox + pad + (v - x0) / (x1 - x0) * (W - 12 - pad)
        py = lambda v: H - pad - (v - y0) / (y1 - y0) * (H - pad - 30)
        for v, anchor_x in ((x0, px(x0)), (x1, px(x1) - 40)):
            d.text((anchor_x, H - pad + 4), f'{v:.3g}', fill='black', font=f12)
        for v in (y0, y1):
            d.text((ox + 2, py(v) - 7), f'{v:.3g}', fill='black', font=f12)
        if np.ptp(x[ok]) > 0:
            k, b = np.polyfit(x[ok], fid[ok], 1)
            ends = [(xe, min(max(k * xe + b, y0), y1)) for xe in (x0, x1)]  # clip to the box: move x where y leaves it
            ends = [((ye - b) / k if k else xe, ye) for xe, ye in ends]
            d.line([px(ends[0][0]), py(ends[0][1]), px(ends[1][0]), py(ends[1][1])], fill=(214, 39, 40), width=2)
        for xv, yv in zip(x[ok], fid[ok]):
            d.ellipse([px(xv) - 4, py(yv) - 4, px(xv) + 4, py(yv) + 4], fill=(31, 119, 180))
    d.text((4, H // 2 - 40), 'FID', fill='black', font=f12)
    out = a.out or str(Path(a.csv).with_suffix('.png'))
    img.save(out)
    print(f"scatter panel: {out}")
    return result


def colormap(x):
    """Values in [0, 1] (any shape) -> uint8 RGB through viridis' anchor colours."""
    anchors = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float)
    x = x.clamp(0, 1) * (len(anchors) - 1)
    lo = x.floor().long().clamp(max=len(anchors) - 2)
    w = (x - lo)[..., None]
    return ((1 - w) * anchors[lo] + w * anchors[lo + 1]).round().to(torch.uint8)


@torch.no_grad()
def spnorm_viz(argv):
    """python irepa.py spnorm-viz --encoder dinov2 [--image IMG]: one token's cosine similarity before/after the z-score."""
    import encoders
    p = argparse.ArgumentParser(prog='irepa.py spnorm-viz', description=spnorm_viz.__doc__)
    p.add_argument('--encoder', required=True)
    p.add_argument('--encoder-weights', default='auto')
    p.add_argument('--image', default=None, help='an image file (center-cropped); default: a synthetic image')
    p.add_argument('--index', type=int, default=3, help='which synthetic image, without --image')
    p.add_argument('--token', default=None, help='row,col of the query token on the grid (default: the centre)')
    p.add_argument('--resolution', type=int, default=256)
    p.add_argument('--spnorm-gamma', type=float, default=0.6)
    p.add_argument('--out', default='out/spnorm-viz.png')
    a = p.parse_args(argv)
    grid = a.resolution // 16
    if a.image:
        with Image.open(a.image) as im:
            img = center_crop(im.convert('RGB'), a.resolution)
    else:
        img = synthetic_image(a.index, a.resolution, 10)[0]
    row, col = map(int, a.token.split(',')) if a.token else (grid // 2, grid // 2)
    if not (0 <= row < grid and 0 <= col < grid):
        raise ValueError(f"--token {row},{col} is outside the {grid}x{grid} grid")
    teacher = encoders.load_teacher(a.encoder, a.encoder_weights, grid)
    f = teacher(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255).float()  # (1, T, D)
    panels = [torch.from_numpy(img)]
    for tokens in (f, spatial_norm(f, a.spnorm_gamma)):
        u = F.normalize(tokens[0], dim=-1)
        sim = (u @ u[row * grid + col]).view(grid, grid)  # cosine similarity to the query token
        heat = colormap((sim + 1) / 2).repeat_interleave(a.resolution // grid, 0).repeat_interleave(a.resolution // grid, 1)
        panels.append(heat)
    canvas = Image.fromarray(torch.cat(panels, 1).numpy())
    d, cell = ImageDraw.Draw(canvas), a.resolution // grid
    for k in range(3):  # mark the query token on each panel
        d.rectangle([k * a.resolution + col * cell, row * cell, k * a.resolution + (col + 1) * cell - 1, (row + 1) * cell - 1], outline='red', width=2)
    titled = Image.new('RGB', (canvas.width, canvas.height + 24), 'white')
    titled.paste(canvas, (0, 24))
    for k, t in enumerate(['image', f'{teacher.name}: cos sim', f'after spatial z-score (gamma {a.spnorm_gamma})']):
        ImageDraw.Draw(titled).text((k * a.resolution + 4, 4), t, fill='black', font=font(13))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    titled.save(a.out)
    lds = [spatial_metrics(t)['lds'].item() for t in (f, spatial_norm(f, a.spnorm_gamma))]
    print(f"token ({row}, {col}); LDS of this image {lds[0]:+.4f} before, {lds[1]:+.4f} after the z-score; picture: {a.out}")
    return lds


# -----------------------------------------------------------------------------
# Command line: one block of defaults; --demo only changes defaults, every flag given still applies

# 16-px images, a tiny SiT and a random teacher where the real one is unavailable: ~3 minutes on 2 CPU cores, enough
# for the EMA model to draw class-coloured shapes. lr and EMA decay are raised for so few steps.
DEMO = dict(model='SiT-T/2', resolution=16, vae='none', max_steps=300, global_batch_size=16, lr=1e-3, ema_decay=0.99,
            log_every=25, ckpt_every=150, sample_every=150, num_workers=0, synthetic_size=2000, out_dir='out/demo')


def get_parser():
    p = argparse.ArgumentParser(description='Train SiT with REPA / iREPA alignment (python irepa.py --demo for a '
                                'CPU demo; torchrun --nproc_per_node=8 irepa.py ... for DDP)',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--model', default='SiT-XL/2', help=f"one of {', '.join(SiT_models)}")
    a('--recipe', default='irepa', choices=list(RECIPES), help='repa: MLP projector, raw targets, lambda 0.5; '
      'irepa: 3x3 conv projector, spatial z-score, lambda 1.0')
    a('--encoder', default='dinov2-vit-b', help="teacher(s), comma-separated (python encoders.py --list); 'none' trains a plain SiT")
    a('--encoder-weights', default='auto', help="'auto' (Hugging Face hub and its cache), a local file (comma-separated, one "
      "per teacher), 'random' or 'random:N' (random init, N blocks: tests only)")
    a('--encoder-depth', type=int, default=None, help='SiT block (1-based) whose output is aligned; default 4 (S, B), 8 (L, XL)')
    a('--projector', choices=['mlp', 'conv'], default=None, help='default: from --recipe')
    a('--proj-kernel', type=int, default=3, help='conv projector kernel (the official LDM script defaults to 1)')
    a('--projector-dim', type=int, default=2048, help='hidden width of the MLP projector')
    a('--spnorm', choices=['none', 'zscore'], default=None, help='spatial normalization of the targets; default: from --recipe')
    a('--spnorm-gamma', type=float, default=0.6, help='share of the token mean removed by the z-score (paper: 1, LDM code: 0.6)')
    a('--proj-coeff', type=float, default=None, help='alignment weight lambda; default: from --recipe')
    a('--siglip-norm', choices=['imagenet', 'siglip'], default='imagenet', help="SigLIP input stats: the paper's ImageNet ones, or SigLIP's 0.5/0.5")
    a('--qk-norm', action=argparse.BooleanOptionalAction, default=False, help='LayerNorm on queries and keys')
    a('--repa-e', action='store_true', help='REPA-E: train the VAE end to end (with --recipe irepa: iREPA-E)')
    a('--vae-align-coeff', type=float, default=1.5, help='REPA-E: weight of the alignment loss in the VAE step')
    a('--vae-lr', type=float, default=1e-4, help='REPA-E: learning rate of the VAE')
    a('--disc-lr', type=float, default=1e-4, help='REPA-E: learning rate of the discriminator')
    a('--lpips-weights', default='auto', help="REPA-E: 'auto', 'LINEAR[,VGG]' files (vgg.pth of LPIPS), or 'random'")
    a('--disc-weights', default='random', help="REPA-E: 'random' or a discriminator state dict (REPA-E starts from a released one)")
    a('--lpips-quirk', action=argparse.BooleanOptionalAction, default=True,
      help='REPA-E feeds LPIPS [-1, 1] images although it expects [0, 1]; --no-lpips-quirk feeds [0, 1]')
    a('--repae-stats-images', type=int, default=2048, help='REPA-E: images for the initial latent BatchNorm statistics')
    a('--meanflow', action='store_true', help='MeanFlow: learn average velocities for 1- or few-step sampling')
    a('--mf-omega', type=float, default=1.0, help='MeanFlow guidance folded into training: omega')
    a('--mf-kappa', type=float, default=0.5, help='MeanFlow guidance: kappa (effective scale omega / (1 - kappa))')
    a('--mf-t-start', type=float, default=0.0, help='MeanFlow guidance interval start')
    a('--mf-t-end', type=float, default=1.0, help='MeanFlow guidance interval end')
    a('--data-path', default=None, help='ImageNet-style folder (<root>/<class>/*.JPEG), a folder of prepared latents, '
      'or nothing for the built-in synthetic set')
    a('--resolution', type=int, default=256, help='image side in pixels')
    a('--vae', default='sd-vae-ft-mse', help="'sd-vae-ft-mse', 'sd-vae-ft-ema', a local file, or 'none' for pixel space")
    a('--latent-scale', type=float, default=None, help="default: per-channel latent stats; 0.18215 reproduces REPA's constant")
    a('--num-classes', type=int, default=10, help='classes of the synthetic set (a folder has its own)')
    a('--synthetic-size', type=int, default=10_000, help='images in the synthetic set')
    a('--prepare', action='store_true', help='encode --data-path with --vae into --out-dir (latents.npy, labels, stats) and exit')
    a('--num-workers', type=int, default=8, help='data loader processes per rank')
    a('--max-steps', type=int, default=400_000)
    a('--global-batch-size', type=int, default=256, help='summed over all processes')
    a('--lr', type=float, default=1e-4)
    a('--adam-beta2', type=float, default=None, help='AdamW beta2; default 0.999, 0.95 with --meanflow (as MeanFlow)')
    a('--grad-clip', type=float, default=1.0)
    a('--ema-decay', type=float, default=0.9999)
    a('--seed', type=int, default=0)
    a('--out-dir', default='out/run')
    a('--log-every', type=int, default=100)
    a('--ckpt-every', type=int, default=50_000)
    a('--sample-every', type=int, default=10_000, help='steps between sample grids of the EMA model')
    a('--sample-mode', choices=['euler', 'heun', 'sde', 'meanflow'], default=None,
      help='sampler of the grids; default euler (sde in --demo, meanflow with --meanflow)')
    a('--sample-steps', type=int, default=None, help='default 50 (1 with --meanflow: one-step generation)')
    a('--cfg-scale', type=float, default=None, help='guidance of the grids; default 4.0 (1.0 with --meanflow: trained in)')
    a('--guidance-low', type=float, default=0.0)
    a('--guidance-high', type=float, default=1.0)
    a('--resume', action='store_true', help='continue from the newest checkpoint in --out-dir')
    a('--device', default='auto', help="'auto', 'cuda' or 'cpu'")
    a('--compile', action=argparse.BooleanOptionalAction, default=None, help='torch.compile (default: on CUDA)')
    a('--demo', action='store_true', help=f'offline CPU demo; sets the defaults {DEMO}')
    return p


def resolve_config(argv=None):
    """Parse the command line into the plain dict that is printed, saved and stored in checkpoints."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = get_parser()
    if '--demo' in argv:
        p.set_defaults(**DEMO)
    cfg = vars(p.parse_args(argv))
    if cfg['repa_e'] and cfg['proj_coeff'] is None:
        cfg['proj_coeff'] = 0.5  # REPA-E's SiT step weighs the alignment 0.5 for both recipes
    if cfg['repa_e'] and cfg['demo'] and cfg['vae'] == 'none':  # the demo's pixel space has no VAE to train
        cfg['vae'], cfg['resolution'] = 'random:tiny', max(cfg['resolution'], 32)  # 32 px: the PatchGAN needs >= 24
    for k, v in RECIPES[cfg['recipe']].items():
        if cfg[k] is None:
            cfg[k] = v
    mf = cfg['meanflow']
    for k, v in dict(adam_beta2=0.95 if mf else 0.999, sample_mode='meanflow' if mf else 'sde' if cfg['demo'] else 'euler',
                     sample_steps=1 if mf else 50, cfg_scale=1.0 if mf else 4.0).items():
        if cfg[k] is None:
            cfg[k] = v
    if cfg['device'] == 'auto':
        cfg['device'] = 'cuda' if torch.cuda.is_available() else 'cpu'
    if cfg['compile'] is None:
        cfg['compile'] = cfg['device'] == 'cuda'
    if cfg['model'] not in SiT_models:
        p.error(f"unknown --model {cfg['model']!r}; accepted: {', '.join(SiT_models)}")
    return cfg


def export_vae(argv):
    """python irepa.py export-vae CKPT OUT.safetensors: the end-to-end-tuned VAE of a --repa-e checkpoint in diffusers'
    layout with its config in the metadata, for `--prepare --vae OUT.safetensors` and a fresh SiT on frozen latents."""
    import safetensors.torch
    p = argparse.ArgumentParser(prog='irepa.py export-vae', description=export_vae.__doc__)
    p.add_argument('ckpt')
    p.add_argument('out')
    a = p.parse_args(argv)
    ckpt = torch.load(a.ckpt, map_location='cpu', weights_only=True)
    if not isinstance(ckpt, dict) or 'vae' not in ckpt:
        raise ValueError(f"{a.ckpt} holds no trained VAE: export-vae needs a checkpoint of `irepa.py --repa-e`")
    latent = ckpt['latent']
    safetensors.torch.save_file({k: v.contiguous() for k, v in ckpt['vae'].items()}, a.out, metadata=dict(
        config=json.dumps(latent['vae_args']), latent_mean=json.dumps(latent['shift']),
        latent_std=json.dumps([1 / s for s in latent['scale']])))
    print(f"wrote the VAE of {a.ckpt} (step {ckpt['step']}) to {a.out}; its latents' BatchNorm statistics (EMA): mean "
          f"{np.round(latent['shift'], 4).tolist()}, std {np.round([1 / s for s in latent['scale']], 4).tolist()}")


COMMANDS = {'metrics': measure_teacher, 'correlate': correlate, 'spnorm-viz': spnorm_viz, 'export-vae': export_vae}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # the analysis commands; everything else trains (or prepares latents)
        return COMMANDS[argv[0]](argv[1:])
    cfg = resolve_config(argv)
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    if ddp:
        dist.init_process_group('nccl' if cfg['device'] == 'cuda' else 'gloo')
    try:
        if dist_info()[0] == 0:
            print(json.dumps(cfg, indent=1))
        if cfg['prepare']:
            device = torch.device(f"cuda:{dist_info()[2]}" if cfg['device'] == 'cuda' else cfg['device'])
            prepare_latents(cfg['data_path'], cfg['out_dir'], cfg['resolution'], cfg['vae'], device, cfg['num_classes'],
                            cfg['seed'], cfg['synthetic_size'], num_workers=cfg['num_workers'])
        else:
            return train(cfg)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
