"""
iREPA in one file. iREPA ("What matters for Representation Alignment: Global Information or Spatial Structure?",
arXiv 2512.10794) changes REPA twice: the 3-layer MLP projector becomes one 3x3 convolution on the token grid, and the
teacher tokens get a spatial z-score over the token axis, y = (f - gamma * mean_T f) / (std_T f + 1e-6).

The file reads in five parts: 1. the method (SiT, both projectors, the spatial norm, the losses, the samplers, the data
and a complete trainer: reading up to its closing banner gives the whole method); 2. the other objectives (REPA-E,
MeanFlow); 3. the paper's study commands; 4. running at scale (run folders, exact resume, preemption, DDP, logging,
the sharded passes of --prepare and the teacher cache), behind one object, `Run`; 5. the command line.

    python irepa.py --demo                                                   # offline, CPU, minutes
    python irepa.py --prepare --data-path /data/imagenet/train --out-dir data/in256          # SD-VAE latents, once
    torchrun --nproc_per_node=8 irepa.py --encoder dinov2 --data-path data/in256 --out-dir out/xl-irepa
    torchrun --nproc_per_node=8 irepa.py --recipe repa | irepa-e | meanflow-irepa ...      # every recipe: RECIPES
    python irepa.py metrics --encoder dinov2 | correlate results.csv | spnorm-viz | export-vae   # the paper's study

Conventions: time runs data -> noise, x_t = (1 - t) x + t eps, the network predicts the velocity v = eps - x, samplers
integrate t from 1 to 0; the null label is index `num_classes`; uint8 images -> [-1, 1] (SiT, VAE), [0, 1] (teachers).
A teacher's output is its `tokens` (B, T, D); after the spatial norm (or raw, for REPA) they are the `targets`.
"""
import argparse
import colorsys
import contextlib
import copy
import csv
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image, ImageDraw, ImageFont
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import encoders


class UserError(ValueError):
    """A mistake of the user, not of the code: a bad value, a missing file, an unknown name, a checkpoint of another
    model. The command lines (cli, Part 5) print it, as they do encoders.LoadError, as one line and exit with code 2;
    any other exception is a bug and keeps its traceback. errors: several mistakes found at once (validate), a line
    each. everywhere: every process of a torchrun job meets it alike, so rank 0 alone says it."""
    def __init__(self, message, errors=None, everywhere=False):
        super().__init__(message)
        self.errors, self.everywhere = errors or [message], everywhere

# =====================================================================================================================
# Part 1. The method
# =====================================================================================================================
# The recipes: every default of a method is in its row; a flag given on the command line overrides it. `objective`
# picks the training unit (Flow below, REPAE or MeanFlow in Part 2); projector, proj_kernel, spnorm, spnorm_gamma and
# proj_coeff (lambda) are the alignment.
FLOW = dict(objective='flow', proj_kernel=3, spnorm_gamma=0.6, adam_beta2=0.999)
REPA_E = FLOW | dict(
    objective='repa-e', proj_coeff=0.5,  # REPA-E's SiT step weighs the alignment 0.5, with either projector
    vae_align_coeff=1.5, vae_lr=1e-4, disc_lr=1e-4,  # the VAE step: regularizer + 1.5 x alignment through the SiT
    l1_coeff=1.0, lpips_coeff=1.0, kl_coeff=1e-6, gan_coeff=0.1,  # the regularizer (REPA-E's l1_lpips_kl_gan.yaml)
    lpips_weights='auto', disc_weights='random', lpips_quirk=True, repae_stats_images=2048)
MEANFLOW = FLOW | dict(
    objective='meanflow', adam_beta2=0.95, preview='meanflow', precision='fp32',  # MeanFlow's ImageNet config
    mf_p_mean=-0.4, mf_p_std=1.0, mf_ratio=0.25,  # t, r logit-normal(-0.4, 1); a quarter of the rows keep r != t
    mf_norm_c=0.01, mf_norm_p=1.0, mf_label_drop=0.1,  # loss weight 1 / sg(L + c)^p; labels dropped in the loss
    mf_omega=1.0, mf_kappa=0.5, mf_t_start=0.0, mf_t_end=1.0)  # guidance trained in: scale omega / (1 - kappa) = 2
REPA = dict(projector='mlp', spnorm='none', proj_coeff=0.5)  # 3-layer MLP, raw teacher tokens, lambda 0.5
IREPA = dict(projector='conv', spnorm='zscore', proj_coeff=1.0)  # 3x3 conv, spatial z-score, lambda 1.0 (LDM config)
RECIPES = {
    'repa': FLOW | REPA,
    'irepa': FLOW | IREPA,
    'conv-only': FLOW | IREPA | dict(spnorm='none'),  # the paper's Table 3: iREPA without the spatial norm
    'spnorm-mlp': FLOW | IREPA | dict(projector='mlp'),  # Table 3: iREPA without the conv projector
    'repa-e': REPA | REPA_E,
    'irepa-e': IREPA | REPA_E,
    'meanflow-repa': MEANFLOW | REPA,
    'meanflow-irepa': MEANFLOW | IREPA,
}
# The defaults every recipe shares (what each one is: python irepa.py --help), in two groups. What the trained model
# depends on: a resumed run must keep it (the run refuses a checkpoint made otherwise).
METHOD = dict(
    recipe='irepa', model='SiT-XL/2', encoder='dinov2-vit-b', encoder_depth=None, projector_dim=2048,
    siglip_norm='imagenet', qk_norm=False, resolution=256, vae='sd-vae-ft-mse', latent_scale=None, num_classes=10,
    synthetic_size=10_000, global_batch_size=256, lr=1e-4, grad_clip=1.0, ema_decay=0.9999, seed=0)  # REPA's optimizer
# How a run goes: these may change when it resumes. precision: the step's autocast (None: bf16 on CUDA, else fp32)
RUN = dict(
    max_steps=400_000, data_path=None, encoder_weights='auto', out_dir='out/run', log_every=100, ckpt_every=50_000,
    sample_every=10_000, preview='sde', num_workers=8, device='auto', precision=None, compile=None, grad_ckpt=False,
    teacher_cache=None, resume=False, prepare=False, demo=False, overwrite=False, keep_last=0, time_limit=None,
    max_bad_fraction=0.01, grad_floor=1e-4, grad_jump=100.0)
DEFAULTS = METHOD | RUN
# The preview samplers of the grids drawn while training: (steps, guidance scale); MeanFlow's guidance is trained in
PREVIEW = {'euler': (50, 4.0), 'heun': (25, 4.0), 'sde': (50, 4.0), 'meanflow': (1, 1.0)}

# -----------------------------------------------------------------------------
# iREPA's two changes, beside REPA's: the projector (SiT tokens -> a teacher's width), the teachers' spatial norm
class Projector(nn.Module):
    """Maps SiT tokens (N, T, D) to one teacher's width (N, T, z_dim). 'mlp' (REPA) acts on each token alone:
    Linear-SiLU-Linear-SiLU-Linear. 'conv' (iREPA) is a single k x k convolution on the row-major token grid, no
    activation, so each output token also sees its neighbours."""
    def __init__(self, kind, hidden_size, z_dim, projector_dim=2048, kernel=3):
        super().__init__()
        if kind == 'mlp':
            self.projection_layer = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                                                  nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                                  nn.Linear(projector_dim, z_dim))
        elif kind == 'conv':
            if kernel % 2 == 0:
                raise UserError(f"conv projector kernel must be odd to keep the token grid, got {kernel}")
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

def spatial_norm(tokens, gamma=0.6, eps=1e-6):
    """iREPA's spatial z-score of teacher tokens (B, T, D): over the token axis, per image and channel. gamma < 1
    keeps part of the global (mean) component; the std is unbiased and eps is added to it (official code)."""
    f = tokens.float()
    return (f - gamma * f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + eps)

# -----------------------------------------------------------------------------
# SiT: a DiT-style transformer with adaLN-Zero blocks, predicting the velocity
def modulate(x, shift, scale):
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # x (1 + scale) + shift: (N, T, D), (N, D)

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
        # (N, D, h, w) -> (N, T, D), row-major tokens, made contiguous: the residual stream keeps the layout of its
        # first tensor, and a transposed one would make every LayerNorm copy it, forward and backward
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()

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
        # (N, T, 3, H, hd) split on its own axis, then each (N, H, T, hd) as a view: the same strides as the usual
        # permute(2, 0, 3, 1, 4).unbind(0), but the backward stacks q, k, v's gradients straight into the layout of
        # qkv's output, where the permuted form copies them once more (a (N, T, 3D) tensor per block)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).unbind(2))
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))

class SiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c gives shift, scale and gate of both branches; gates start at zero."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)  # the official keys: mlp.fc1, mlp.fc2
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU('tanh'),
                                             fc2=nn.Linear(hidden, dim)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1)))  # x + gate * attn
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))  # one pass each

class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)

class SiT(nn.Module):
    """SiT with one projector per teacher on the output of block `encoder_depth` (1-based, before any norm).
    meanflow=True adds MeanFlow's second time embedder (on h = t - r) and leaves label dropout to its loss."""
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1, qk_norm=False,
                 encoder_depth=8, z_dims=(768,), projector='conv', proj_kernel=3, projector_dim=2048, meanflow=False):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise UserError(f"encoder_depth must be in 1..{depth} (the aligned block), got {encoder_depth}")
        if input_size % patch_size:
            raise UserError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if meanflow:
            self.h_embedder = TimestepEmbedder(hidden_size)
            self.y_embedder.dropout_prob = 0.0  # the table keeps its null row for guidance
        self.register_buffer('pos_embed', sincos_pos_embed(hidden_size, input_size // patch_size))  # fixed, (1, T, D)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList(Projector(projector, hidden_size, z, projector_dim, proj_kernel)
                                        for z in z_dims)  # one per teacher
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.grad_ckpt = False  # --grad-ckpt: recompute each block in the backward instead of keeping its activations
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # xavier for every Linear, projector MLP included; the conv projector: torch's init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (m for m in self.x_embedder.modules() if isinstance(m, nn.Conv2d)):  # patch embedding (JiT: 2)
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))  # like a Linear on the flat patch
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in [self.t_embedder] + ([self.h_embedder] if hasattr(self, 'h_embedder') else []):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: each block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x):  # (N, T, p*p*C) -> (N, C, h, p, w, p) -> (N, C, h p, w p)
        h, p, C = math.isqrt(x.shape[1]), self.patch_size, self.in_channels
        return x.view(-1, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(-1, C, h * p, h * p)

    def forward(self, x, t, y, align=True, align_only=False, r=None):
        """x (N, C, H, W) at times t (N,) with labels y (N,) -> velocity (N, C, H, W) and the projected tokens, one
        (N, T, z_dim) per teacher. align_only stops after block encoder_depth and returns (None, projected): REPA-E's
        VAE step needs nothing more. MeanFlow models take r (N,) <= t and return the average velocity over [r, t]."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        if hasattr(self, 'h_embedder'):
            c = c + self.h_embedder(t - (t if r is None else r))  # r = t (default): h = 0, the instantaneous velocity
        projected = []
        for i, block in enumerate(self.blocks):
            if self.grad_ckpt and torch.is_grad_enabled():  # keeps only the block's input; no RNG inside a block
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(x, c)
            if (align or align_only) and i + 1 == self.encoder_depth:
                projected = [projector(x) for projector in self.projectors]
                if align_only:
                    return None, projected
        return self.unpatchify(self.final_layer(x, c)), projected

# depth, width, heads, aligned block. S/B/L/XL are the paper's; T (tiny) is ours, for the CPU demo and tests.
SIZES = dict(T=(6, 192, 3, 2), S=(12, 384, 6, 4), B=(12, 768, 12, 4), L=(24, 1024, 16, 8), XL=(28, 1152, 16, 8))
MODELS = [f'SiT-{s}/{p}' for s in SIZES for p in (2, 4, 8)]

def sit_args(name, **kwargs):
    """The constructor arguments of SiT `name` (SiT-XL/2: size XL, patch 2); None values take the size's default."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")
    size, patch = name[4:].split('/')
    base = dict(zip(('depth', 'hidden_size', 'num_heads', 'encoder_depth'), SIZES[size]), patch_size=int(patch))
    return base | {k: v for k, v in kwargs.items() if v is not None}

def build_sit(name, **kwargs):
    return SiT(**sit_args(name, **kwargs))

# -----------------------------------------------------------------------------
# Flow matching and the alignment loss
def interpolate(x, noise, t):
    """The linear path: x_t = (1 - t) x + t eps, so t = 0 is data and t = 1 is noise; its velocity is eps - x."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - t) * x + t * noise

def alignment_loss(projected, targets, device='cpu'):
    """Mean over teachers, images and tokens of -cos(projected SiT token, teacher target); -1 is perfect alignment.
    Without teachers: 0, made on `device` (a CPU zero moved there every step would be a blocking copy)."""
    if not projected:
        return torch.zeros((), device=device)
    cos = [(F.normalize(p.float(), dim=-1) * F.normalize(t.float(), dim=-1)).sum(-1).mean()
           for p, t in zip(projected, targets)]
    return -torch.stack(cos).mean()

def flow_loss(model, x, y, targets, t=None, noise=None):
    """Flow matching with uniform t and velocity target, plus alignment: {'flow': MSE, 'align': alignment loss}."""
    t = torch.rand(x.shape[0], device=x.device) if t is None else t
    noise = torch.randn_like(x) if noise is None else noise
    v, projected = model(interpolate(x, noise, t), t, y, align=bool(targets))
    return dict(flow=F.mse_loss(v.float(), (noise - x).float()), align=alignment_loss(projected, targets, x.device))

# -----------------------------------------------------------------------------
# Samplers: Euler / Heun ODE and Euler-Maruyama SDE, t from 1 to 0, state in float64 (as the official code)
@functools.cache
def time_grid(mode, num_steps):
    """The sampler's times from 1 to 0 as host floats (float64), once per setting: uniform (ODE, MeanFlow), or the
    SDE's linspace(1, 0.04, num_steps) and 0."""
    f64 = dict(dtype=torch.float64)
    ts = torch.linspace(1, 0, num_steps + 1, **f64) if mode != 'sde' else \
        torch.cat([torch.linspace(1.0, 0.04, num_steps, **f64), torch.zeros(1, **f64)])
    return tuple(ts.tolist())

@torch.no_grad()
def sample(model, noise, y, mode='sde', num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
           generator=None, eps=None):
    """Latents from `noise` (t = 1) with labels y. mode: 'euler', 'heun' (ODE), 'sde' (Euler-Maruyama) or 'meanflow'
    (average-velocity jumps z_r = z_t - (t - r) u; MeanFlow models; 1 step = 1 NFE). Classifier-free guidance acts on
    all channels while guidance_low <= t <= guidance_high, cond and uncond in one batch. The SDE uses w(t) = 2t on
    linspace(1, 0.04, num_steps) and a last, deterministic step to 0; its float64 noise comes from `generator` on
    its device, a step at a time, or is given whole: eps (num_steps - 1, *noise.shape) on noise's device."""
    if model.training:
        raise ValueError("sample with the model in eval mode (the EMA model): train mode drops labels at random")
    if mode not in PREVIEW:
        raise ValueError(f"unknown sampler {mode!r}; accepted: {', '.join(PREVIEW)}")
    dtype, device = noise.dtype, noise.device
    y_null = torch.full_like(y, model.num_classes)

    def velocity(x, t, guided, r=None):  # x (B, C, H, W) float64, t a python float -> (B, C, H, W) float64
        x, yy = (torch.cat([x, x]), torch.cat([y, y_null])) if guided else (x, y)  # cond and uncond in one batch
        t_in = torch.full((x.shape[0],), t, dtype=torch.float64, device=device).to(dtype)
        kw = {} if r is None else dict(r=torch.full_like(t_in, r))  # MeanFlow: the average velocity over [r, t]
        v = model(x.to(dtype), t_in, yy, align=False, **kw)[0].double()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return v

    guided = lambda t: cfg_scale > 1.0 and guidance_low <= t <= guidance_high
    x, ts = noise.double(), time_grid(mode, num_steps)
    if mode != 'sde':  # a uniform grid from 1 to 0
        for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            d = velocity(x, t, guided(t), t_next if mode == 'meanflow' else None)  # MeanFlow: z_r = z_t - (t - r) u
            x_next = x + (t_next - t) * d
            if mode == 'heun' and i < num_steps - 1:  # 2nd-order correction, skipped on the last step
                x_next = x + (t_next - t) * 0.5 * (d + velocity(x_next, t_next, guided(t)))
            x = x_next
        return x.to(dtype)

    def drift(x, t):  # SDE drift d = v - 1/2 w(t) score, score from the velocity on the linear path
        v = velocity(x, t, guided(t))  # guidance on v equals guidance on the drift: the drift is affine in v
        score = ((t - 1) * v - x) / t
        return v - 0.5 * (2 * t) * score

    for i, (t, t_next) in enumerate(zip(ts[:-2], ts[1:-1])):
        dt = t_next - t
        e = eps[i] if eps is not None else torch.randn(x.shape, dtype=torch.float64, generator=generator,
                                                       device=device if generator is None else generator.device)
        x = x + drift(x, t) * dt + math.sqrt(2 * t) * math.sqrt(abs(dt)) * e.to(device)
    t, t_next = ts[-2], ts[-1]
    return (x + drift(x, t) * (t_next - t)).to(dtype)  # last step: the mean, no noise

# -----------------------------------------------------------------------------
# Data: the built-in synthetic set, an ImageNet-style folder, prepared VAE latents, cached teacher tokens
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')

def synthetic_image(index, resolution, num_classes, seed=0):
    """Image `index` of the built-in set and its mask: one coloured shape on a striped, two-colour background. The class
    fixes the shape (disc, square, triangle, ring, cross) and the hue; position, size, background and stripes vary per
    image. Deterministic in (seed, index), so no file is needed and every rank sees the same set."""
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
    d2 = dx ** 2 + dy ** 2
    mask = [d2 < r ** 2,  # disc, square, triangle, ring, cross
            np.maximum(dx, dy) < 0.8 * r,
            (yy - cy > -r) & (yy - cy < r) & (dx < (yy - cy + r) / 2),
            (d2 < r ** 2) & (d2 > (0.55 * r) ** 2),
            ((dx < r / 3) & (dy < r)) | ((dy < r / 3) & (dx < r))][label % 5]
    hue = (label / num_classes + rng.uniform(-0.2, 0.2) / num_classes) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    shade = 0.8 + 0.2 * (1 - np.clip(np.hypot(xx - cx + r / 3, yy - cy + r / 3) / (2 * r), 0, 1))  # lit from top left
    img[mask] = colour * shade[mask, None]
    return (img * 255).round().clip(0, 255).astype(np.uint8), label, mask  # (R, R, 3) uint8, int, (R, R) bool

def center_crop(pil_image, resolution, mode='RGB'):
    """ADM's center crop of a PIL image (or of an image file, in `mode`): halve with a box filter while possible,
    bicubic resize of the short side, crop the centre."""
    if not isinstance(pil_image, Image.Image):
        with Image.open(pil_image) as im:
            return center_crop(im.convert(mode), resolution)
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
        raise UserError(f"--data-path {root} is not a folder; expected <root>/<class>/*.JPEG or prepared latents")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    found = [(str(f.relative_to(root)), label) for label, c in enumerate(classes) for f in sorted((root / c).rglob('*'))
             if f.suffix.lower() in IMAGE_EXTS]
    files, labels = map(list, zip(*found)) if found else ([], [])
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTS)}) in class folders under {root}; "
                        f"expected the ImageNet layout <root>/<class>/<image>")
    return root, files, labels, classes

class ImageData(torch.utils.data.Dataset):
    """Images (synthetic or from a folder) at one resolution, optionally paired by index with prepared latents."""
    def __init__(self, data_path, resolution, num_classes=10, seed=0, synthetic_size=10_000):
        self.resolution, self.latents, self.meta = resolution, None, None
        self.tokens, self.images = (), True  # see serving
        data_path = Path(data_path) if data_path else None
        if data_path and (data_path / 'meta.json').exists():  # prepared latents: read the source they were made from
            self.meta = meta = json.loads((data_path / 'meta.json').read_text())
            if meta['resolution'] != resolution:
                raise UserError(f"{data_path} holds latents of {meta['resolution']} px images; pass --resolution "
                                f"{meta['resolution']}")
            self.latents = np.load(data_path / 'latents.npy', mmap_mode='r')  # (N, 2C, h, w) fp16: posterior mean, std
            data_path = Path(meta['source']) if meta['source'] != 'synthetic' else None
            num_classes, seed, synthetic_size = meta['num_classes'], meta['seed'], meta['size']
        if data_path is None:
            self.root, self.files, self.num_classes, self.seed = None, None, num_classes, seed
            self.labels = np.arange(synthetic_size) % num_classes
        else:
            self.root, self.files, labels, classes = list_image_folder(data_path)
            self.labels, self.num_classes = np.array(labels), len(classes)
        if self.latents is not None and len(self.latents) != len(self.labels):
            raise UserError(f"prepared latents hold {len(self.latents)} images but the source has {len(self.labels)}; "
                            f"run --prepare again")

    def __len__(self):
        return len(self.labels)

    def serving(self, tokens, images=True):
        """A copy that also serves cached teacher tokens (N, T, D); images=False: it reads no image (latents do)."""
        data = copy.copy(self)
        data.tokens, data.images = tokens, images
        return data

    def image(self, i):  # (R, R, 3) uint8, and the unreadable files read instead of it: [(path, reason)]
        if self.files is None:
            return synthetic_image(i, self.resolution, self.num_classes, self.seed)[0], []
        return readable_image(self, i)  # center_crop(self.root / self.files[i]), or the next readable one (Part 4)

    def __getitem__(self, i):
        img, bad = self.image(i) if self.images else (None, [])
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) if self.images else torch.empty(0)
        moments = torch.from_numpy(np.array(self.latents[i])) if self.latents is not None else torch.empty(0)
        tokens = tuple(torch.from_numpy(np.array(t[i])) for t in self.tokens)  # (T, D) each; bf16 as int16 bits
        return img, moments, int(self.labels[i]), tokens, bad  # (3, R, R) uint8, (2C, h, w), label, tokens, files

class LatentNorm:
    """VAE latents <-> the SiT's space, per channel: z = (latent - mean) / std and back. iREPA: the data's statistics
    (from --prepare); REPA: mean 0, std 1 / 0.18215; REPA-E: its BatchNorm's EMA statistics. `vae` decodes
    ('checkpoint': the VAE REPA-E trained, from vae_args); checkpoints hold it as a dict (to_dict), all fid.py needs.
    The constants live on `device`: a CPU tensor moved to the GPU in every step would be a blocking copy. scale: the
    official checkpoints' factor, which their samplers divide by (z / scale + mean: its float32 last bit)."""
    def __init__(self, vae, mean, std, vae_args=None, scale=None, device='cpu'):
        self.vae, self.vae_args = vae, vae_args
        self.mean, self.std = (torch.as_tensor(v, dtype=torch.float32).flatten().view(1, -1, 1, 1).to(device)
                               for v in (mean, std))
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32).view(1, -1, 1, 1).to(device)

    def normalize(self, latent):
        return (latent - self.mean.to(latent)) / self.std.to(latent)

    def denormalize(self, z):
        if self.scale is not None:
            return z / self.scale.to(z) + self.mean.to(z)  # the official generate.py's expression
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self):
        return dict(vae=self.vae, mean=self.mean.flatten().tolist(), std=self.std.flatten().tolist(),
                    vae_args=self.vae_args) | ({} if self.scale is None else dict(scale=self.scale.flatten().tolist()))

    @staticmethod
    def from_dict(d, device='cpu'):
        return d and LatentNorm(d['vae'], d['mean'], d['std'], d.get('vae_args'), d.get('scale'), device)

def to_pixels(z, vae, norm):
    """The SiT's outputs (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]; in pixel space (norm None) they are."""
    return z if norm is None else vae.decode(norm.denormalize(z))

# -----------------------------------------------------------------------------
# The trainer: a unit per objective owns its networks, optimizers, step and preview (Flow here: REPA and iREPA; REPAE
# and MeanFlow in Part 2); `run` (Part 4) owns the rest; the loop is `train`
def adamw(params, lr, beta2):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=0, eps=1e-8,
                             fused=True)  # one kernel for all tensors, on CUDA and CPU alike

def ema_update(ema, model, decay):
    """fp32 EMA of the parameters and float buffers (REPA-E's BatchNorm statistics), one kernel per group."""
    floats = lambda m: [*m.parameters(), *(b for b in m.buffers() if b.is_floating_point())]
    with torch.no_grad():
        torch._foreach_lerp_(floats(ema), floats(model), 1 - decay)

def clipped_step(loss, module, opt, clip, keep_grads=False):
    """backward, clip the gradient norm, AdamW step; returns the norm before clipping, on the device. The gradients
    are dropped after the step, or with keep_grads just before the next backward: on a CPU glibc returns the freed top
    of its heap to the OS, which the next forward would fault in afresh (SiT-S/2, batch 8: ~150K page faults a step)."""
    opt.zero_grad(set_to_none=True)  # a kept gradient is replaced, not added to: the same numbers
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(module.parameters(), clip or math.inf)  # clip 0: none (JiT), scale 1
    opt.step()
    if not keep_grads:
        opt.zero_grad(set_to_none=True)
    return grad_norm

@torch.no_grad()
def teacher_targets(run, img, tokens=()):
    """The alignment targets of a batch of uint8 images: each frozen teacher's tokens (B, T, D), spatially z-scored
    (iREPA) or raw (REPA). `tokens`: the same tokens read from the teacher cache, so the teachers do not run."""
    if not tokens:
        with run.autocast:
            tokens = [teacher(img.float() / 255) for teacher in run.teachers]
    return [spatial_norm(t, run.cfg.spnorm_gamma) for t in tokens] if run.cfg.spnorm == 'zscore' else tokens

def model_input(img, moments, norm):
    """The clean x the SiT learns: a fresh posterior sample of the latent, normalized (or the image in [-1, 1])."""
    if norm is None:
        return img.float() / 127.5 - 1
    mean, std = moments.float().chunk(2, dim=1)  # (B, C, h, w) each
    return norm.normalize(mean + std * torch.randn_like(std))

class Flow:
    """REPA and iREPA: flow matching + proj_coeff x alignment. The unit owns the SiT, its EMA and AdamW (`saved`: what
    a checkpoint holds); shape: the SiT's input (channels, side), by default the data's."""
    sit_kw, vae, latents = {}, None, True  # MeanFlow: a second time embedder; REPA-E: its VAE, trained on images

    def __init__(self, cfg, run, shape=None):
        self.cfg, self.norm, self.autocast = cfg, run.norm, run.autocast
        C, size = shape or run.shape
        teachers = run.load_teachers(grid=size // int(cfg.model.split('/')[1]))  # frozen
        self.model_args = sit_args(cfg.model, input_size=size, in_channels=C, num_classes=run.data.num_classes,
                                   encoder_depth=cfg.encoder_depth, z_dims=[t.dim for t in teachers],
                                   projector=cfg.projector, proj_kernel=cfg.proj_kernel,
                                   projector_dim=cfg.projector_dim, qk_norm=cfg.qk_norm, **self.sit_kw)
        self.model = SiT(**self.model_args).to(run.device)
        self.model.grad_ckpt = cfg.grad_ckpt
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = adamw(self.model.parameters(), cfg.lr, cfg.adam_beta2)
        self.train_model = run.wrap(self.model)  # DDP under torchrun, then torch.compile with --compile
        self.saved = dict(model=self.model, ema=self.ema, opt=self.opt)

    def loss(self, x, y, targets):
        with self.autocast:
            return flow_loss(self.train_model, x, y, targets)

    def step(self, img, moments, y, targets):
        """One training step on a batch: uint8 images (B, 3, R, R) (or VAE moments (B, 2C, h, w)), labels and the
        teacher targets. Returns the losses and gradient norm, on the device: reading them would stall the GPU."""
        losses = self.loss(model_input(img, moments, self.norm), y, targets)
        loss = losses['flow'] + self.cfg.proj_coeff * losses['align']
        grad_norm = clipped_step(loss, self.model, self.opt, self.cfg.grad_clip, keep_grads=y.device.type == 'cpu')
        ema_update(self.ema, self.model, self.cfg.ema_decay)
        return {k: v.detach() for k, v in losses.items()} | dict(grad_norm=grad_norm)

    def transform(self, img):  # the recipe's data augmentation of a batch: none (the teacher cache relies on it)
        return img

    def latent_norm(self):  # SiT outputs -> VAE latents (None: pixel space); checkpoints keep it for fid.py
        return self.norm

    @torch.no_grad()
    def preview(self, noise, y, eps=None):
        """Images in [-1, 1] of the EMA model from `noise`, with the recipe's preview sampler (SDE: its noise `eps`)."""
        if self.norm is not None and self.vae is None:  # prepared latents: the VAE is needed for the pictures only
            self.vae = encoders.load_vae(self.norm.vae, device=noise.device)
        steps, cfg_scale = PREVIEW[self.cfg.preview]
        with self.autocast:
            z = sample(self.ema, noise, y, self.cfg.preview, steps, cfg_scale, eps=eps)
            return to_pixels(z.float(), self.vae, self.latent_norm())

    def flops(self):  # training FLOPs per image of a step, for MFU
        return sit_train_flops(self.model)

def train(cfg):
    """The loop: a batch, its teacher targets, the objective's step; `run` keeps the sums for the log and, at
    intervals, writes a log line, a checkpoint, a sample grid, and says when a stop signal or the time limit ends the
    run. No line here reads a number from the GPU: Python runs ahead of it. Returns the run (its unit: run.unit)."""
    run = Run(cfg)  # processes and device, run folder, data, --resume's checkpoint
    unit = OBJECTIVES[cfg.objective](cfg, run)  # Flow above; REPAE, MeanFlow in Part 2
    for step in range(run.start(unit), cfg.max_steps):  # run.start: restored from the checkpoint, or 0
        img, moments, y, tokens = run.batch()  # on the device; tokens: from the teacher cache, if any
        stats = unit.step(img, moments, y, teacher_targets(run, img, tokens))
        if run.end_step(step + 1, stats):
            break
    run.finish()
    return run

# =====================================================================================================================
# A reader may stop here: Part 1 is the whole method and a trainer. Part 2 is REPA-E and MeanFlow, 3 the paper's
# study, 4 what a cluster needs (Run: run folders, exact resume, preemption, DDP, the teacher cache, logs), 5 the CLI.
# =====================================================================================================================
# Part 2. The other objectives: each a unit like Flow, with its own networks, optimizers, step and preview
# =====================================================================================================================
# REPA-E (--recipe repa-e, irepa-e): the VAE trains end to end through the alignment loss. Each step (1) updates the
# VAE on its regularizer + vae_align_coeff x alignment through the frozen SiT, (2) the PatchGAN discriminator, (3) the
# SiT on the detached latent, with the same t and noise. Latents pass a BatchNorm without affine (an affine could
# cheat the diffusion loss) whose EMA statistics also denormalize at sampling.
def normalize_latents(bn, z):
    """REPA-E's latent BatchNorm (affine off). In eval mode: running statistics, differentiable in z. In train mode:
    batch statistics over all ranks (SyncBN), which update the running ones; z is detached there, so no gradient
    needs to flow through the statistics and this works with any backend (SyncBatchNorm needs a GPU)."""
    z = z.float()  # fp32 statistics and running buffers, also when the VAE runs under bf16 autocast
    if not bn.training:
        return bn(z)
    with torch.no_grad():
        s = torch.stack([z.sum((0, 2, 3)), z.square().sum((0, 2, 3)), torch.full_like(z[0, :, 0, 0], z[:, 0].numel())])
        if dist.is_initialized() and dist.get_world_size() > 1:
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

class REPAE(Flow):
    """REPA-E's unit: the SiT of Flow on the latents of a VAE it trains, a PatchGAN discriminator and a frozen LPIPS,
    three optimizers, the latent BatchNorm and its EMA. In --demo, missing LPIPS weights become random ones."""
    latents = False  # it trains on images
    def __init__(self, cfg, run):
        self.vae = encoders.load_vae(cfg.vae, device=run.device)
        self.disc = encoders.load_discriminator(cfg.disc_weights, device=run.device)
        self.lpips = encoders.load_lpips(cfg.lpips_weights, run.device, cfg.demo)  # frozen
        self.bn = nn.BatchNorm2d(self.vae.latent_channels, eps=1e-4, momentum=0.1, affine=False).to(run.device)
        if run.fresh:  # start from the initial VAE's latent statistics (REPA-E's stats file), over all ranks
            ids = list(range(run.rank, min(len(run.data), cfg.repae_stats_images), run.world))
            sums = torch.zeros(3, self.vae.latent_channels, dtype=torch.float64, device=run.device)
            with torch.no_grad():
                for _, mean, std in latent_moments(run.data, self.vae, ids, run.device):
                    sums += moment_sums(mean, std)
            if run.world > 1:
                dist.all_reduce(sums)  # all ranks' images
            mean, std = latent_stats(sums)
            self.bn.running_mean.copy_(mean)
            self.bn.running_var.copy_(std ** 2)
        self.ema_bn = copy.deepcopy(self.bn).eval()
        super().__init__(cfg, run, (self.vae.latent_channels, cfg.resolution // self.vae.downsample))
        self.opt_vae, self.opt_disc = (adamw(m.parameters(), lr, cfg.adam_beta2)
                                       for m, lr in ((self.vae, cfg.vae_lr), (self.disc, cfg.disc_lr)))
        self.saved |= dict(vae=self.vae, disc=self.disc, opt_vae=self.opt_vae, opt_disc=self.opt_disc, bn=self.bn,
                           ema_bn=self.ema_bn)
        self.train_vae, self.world = run.wrap(self.vae, compile=False), run.world

    def step(self, img, moments, y, targets):
        """(1) The VAE: regularizer + vae_align_coeff x alignment through the frozen SiT (eval mode: no label dropout,
        BatchNorm on running statistics; the gradient reaches z through trunk and projector). (2) The discriminator,
        hinge loss. (3) The SiT on the detached latent, same t and noise."""
        cfg = self.cfg
        x = img.float() / 127.5 - 1
        with self.autocast:
            mean, std, z, recon = self.train_vae(x)  # (B, C, h, w) x 3 and (B, 3, R, R)
        t, noise = torch.rand(x.shape[0], device=x.device), torch.randn_like(z)
        self.model.requires_grad_(False).eval()  # (1) only the VAE learns
        self.bn.eval()
        self.disc.requires_grad_(False)
        lpips_in = (lambda v: v) if cfg.lpips_quirk else (lambda v: (v + 1) / 2)  # upstream: [-1, 1] into LPIPS
        with self.autocast:
            projected = self.model(interpolate(normalize_latents(self.bn, z), noise, t), t, y, align_only=True)[1]
            vae_align = alignment_loss(projected, targets, x.device)
            terms = dict(l1=(x - recon.float()).abs().mean(),
                         lpips=self.lpips(lpips_in(x), lpips_in(recon.float())).mean(),
                         kl=kl_loss(mean.float(), std.float()), gan=-self.disc(recon).float().mean())
        vae_loss = sum(getattr(cfg, f'{k}_coeff') * v for k, v in terms.items()) + cfg.vae_align_coeff * vae_align
        grad_norm_vae = clipped_step(vae_loss, self.vae, self.opt_vae, cfg.grad_clip)
        self.model.requires_grad_(True).train()  # (2) the discriminator, (3) the SiT
        self.bn.train()
        self.disc.requires_grad_(True)
        with self.autocast:  # two forwards: BatchNorm statistics per batch, as taming's
            d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()).float())
        d_loss.backward()
        if self.world > 1:  # by hand: DDP allows one forward per backward, the discriminator runs twice
            for p in self.disc.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.world
        grad_norm_disc = nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
        self.opt_disc.step()
        self.opt_disc.zero_grad(set_to_none=True)
        with self.autocast:
            losses = flow_loss(self.train_model, normalize_latents(self.bn, z.detach()), y, targets, t, noise)
        grad_norm = clipped_step(losses['flow'] + cfg.proj_coeff * losses['align'], self.model, self.opt, cfg.grad_clip)
        ema_update(self.ema, self.model, cfg.ema_decay)  # (no SiT gradient is kept into the next VAE step)
        ema_update(self.ema_bn, self.bn, cfg.ema_decay)  # the EMA model samples in the space of the EMA statistics
        return {k: v.detach() for k, v in losses.items()} | dict(
            grad_norm=grad_norm, vae_loss=vae_loss.detach(), vae_align=vae_align.detach(), d_loss=d_loss.detach(),
            grad_norm_vae=grad_norm_vae, grad_norm_disc=grad_norm_disc, **{k: v.detach() for k, v in terms.items()})

    def latent_norm(self):
        """SiT latents -> VAE latents by the BatchNorm's EMA statistics (without eps), and the trained VAE."""
        return LatentNorm('checkpoint', self.ema_bn.running_mean, self.ema_bn.running_var.sqrt(), self.vae.args)

    def flops(self):
        """+ the VAE step (the VAE 3 forwards; the frozen LPIPS, discriminator and SiT up to the aligned block 2 each:
        the gradient passes to their input) + the discriminator's step (real and fake images: 2 each)."""
        img, sit = (1, 3, self.cfg.resolution, self.cfg.resolution), super().flops()
        disc = forward_flops(self.disc, img)
        trunk = sit / 3 * self.model.encoder_depth / len(self.model.blocks)  # the SiT up to the aligned block
        return sit + 3 * forward_flops(self.vae, img) + 2 * (forward_flops(self.lpips, img, img) + 3 * disc + trunk)

def export_vae(argv):
    """python irepa.py export-vae CKPT OUT.safetensors: the VAE a REPA-E run trained, as a file --vae reads (diffusers'
    layout, its config and latent statistics in the metadata), for --prepare and a fresh SiT on frozen latents."""
    p = study_parser('export-vae', export_vae.__doc__)
    p.add_argument('ckpt', type=existing_file, help='a checkpoint of --recipe repa-e or irepa-e')
    p.add_argument('out', help='the VAE file to write (.safetensors)')
    a = p.parse_args(argv)
    encoders.export_vae(a.ckpt, a.out)

# -----------------------------------------------------------------------------
# MeanFlow (--recipe meanflow-repa, meanflow-irepa): the network learns the average velocity
# u(z, r, t) = 1/(t - r) int_r^t v, so that one step z_r = z_t - (t - r) u jumps along the flow. Differentiating
# (t - r) u = int_r^t v in t gives the MeanFlow identity u = v - (t - r) du/dt with du/dt = v d_z u + d_t u
# (dr/dt = 0), which makes the regression target. The alignment uses the hidden state of the gradient-carrying pass.
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

def meanflow_loss(model, raw, x, y, targets, cfg, autocast=contextlib.nullcontext()):
    """{'flow': the adaptively weighted MeanFlow loss, 'align', 'mse': the plain error, for the log}. `model` carries
    the gradient (the DDP wrapper under torchrun: gradients synchronize); `raw` is the bare module for the guidance
    and JVP passes (torch.func.jvp cannot go through DDP). cfg's mf_* settings are the recipe's. `autocast` covers the
    gradient-carrying pass only: the target (guidance and JVP) is always fp32, as MeanFlow's."""
    t, r = sample_tr(x.shape[0], x.device, cfg.mf_p_mean, cfg.mf_p_std, cfg.mf_ratio)
    noise = torch.randn_like(x)
    z, v = interpolate(x, noise, t), noise - x
    y = torch.where(torch.rand(y.shape, device=y.device) < cfg.mf_label_drop, raw.num_classes, y)  # in the loss
    v_g = guided_velocity(raw, z, t, y, v, cfg.mf_omega, cfg.mf_kappa, (cfg.mf_t_start, cfg.mf_t_end))
    u_tgt = meanflow_target(lambda z_, t_, r_: raw(z_, t_, y, align=False, r=r_)[0], z, t, r, v_g)
    with autocast:  # the gradient-carrying pass; its hidden state is aligned
        u, projected = model(z, t, y, r=r, align=bool(targets))
    err = (u.float() - u_tgt).square().sum((1, 2, 3))  # per image, summed over pixels
    loss = (err / (err.detach() + cfg.mf_norm_c) ** cfg.mf_norm_p).mean()  # adaptive weight 1 / sg(L + c)^p
    return dict(flow=loss, align=alignment_loss(projected, targets, x.device), mse=err.detach().mean() / u[0].numel())

class MeanFlow(Flow):
    """MeanFlow + alignment: Flow's unit with a second time embedder and MeanFlow's loss, fp32 as MeanFlow (the
    rows' precision); --precision bf16 autocasts the gradient-carrying pass, never the JVP target. Its preview
    sampler, 'meanflow', takes one average-velocity jump."""
    sit_kw = dict(meanflow=True)

    def loss(self, x, y, targets):
        return meanflow_loss(self.train_model, self.model, x, y, targets, self.cfg, self.autocast)

    def flops(self):
        """+ the guidance pass (cond and uncond: 2 forwards, when guidance is trained in) + the JVP (primal and
        tangent: 2)."""
        sit = super().flops()
        return sit + sit / 3 * (2 * (self.cfg.mf_omega != 1.0 or self.cfg.mf_kappa != 0.0) + 2)

# -----------------------------------------------------------------------------
# JiT (--recipe jit-repa, jit-irepa; --model JiT-B/16 ...): pixel-space diffusion with "Just image Transformers", the
# official code's jit/ tree. The network predicts the clean image x; the loss is on the velocity derived from it.
# JiT's time runs the other way from SiT's, as in the official code, whose formulas these read like: t = 0 is noise,
# t = 1 the clean image, z_t = t x + (1 - t) e. Its blocks differ from SiT's: RMSNorm, attention with RMS-normed
# queries and keys under 2-D RoPE, SwiGLU, a bottleneck patch embedding, class tokens in context from a middle block.
JIT = FLOW | dict(
    objective='jit', model='JiT-B/16', vae='none', proj_coeff=0.5, spnorm_gamma=0.8,  # main_jit.py's zscore_alpha
    lr=None, jit_blr=5e-5, jit_warmup_epochs=5, adam_beta2=0.95, grad_clip=0.0,  # lr None: blr x batch / 256
    jit_p_mean=-0.8, jit_p_std=0.8, jit_t_eps=0.05, jit_noise_scale=1.0, jit_label_drop=0.1,  # t ~ logit-normal
    jit_ema_decay2=0.9996, preview='heun')  # two EMAs: ema_decay's (0.9999) samples, and this one
RECIPES |= {'jit-repa': REPA | JIT, 'jit-irepa': IREPA | JIT}  # lambda 0.5 for both (configs/repa.yaml, irepa.yaml)

class RMSNorm(nn.Module):
    """x / rms(x) x weight, in fp32 also under autocast (the official RMSNorm casts up, and back at the end)."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return (F.rms_norm(x.float(), x.shape[-1:], eps=self.eps) * self.weight).to(x.dtype)

def rope_tables(head_dim, grid, extra=0):
    """2-D RoPE as (cos, sin), each (extra + grid^2, head_dim): channel pairs (2i, 2i + 1) rotate together, the first
    half of a head's channels by the token's row, the second half by its column. The `extra` in-context tokens in
    front are not rotated (cos 1, sin 0). float32, with the official expressions: the same last bits."""
    q = head_dim // 2  # channels per axis
    freqs = 1.0 / (10000 ** (torch.arange(0, q, 2)[:q // 2].float() / q))  # (q/2,)
    a = ((torch.arange(grid) / grid * grid)[:, None] * freqs).repeat_interleave(2, dim=1)  # (grid, q): one per pair
    angles = torch.cat([a[:, None].expand(-1, grid, -1), a[None].expand(grid, -1, -1)], -1)  # (row, col, head_dim)
    angles = angles.reshape(grid * grid, head_dim)  # token k = row * grid + col
    fixed = lambda v: torch.full((extra, head_dim), float(v))
    return torch.cat([fixed(1), angles.cos()]), torch.cat([fixed(0), angles.sin()])

def rope(x, cos, sin):
    """Rotate each channel pair (x0, x1) of x (N, H, T, hd) by its angle: (x0 cos - x1 sin, x1 cos + x0 sin)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (N, H, T, hd/2) each
    return x * cos + torch.stack([-x1, x0], dim=-1).flatten(-2) * sin

class JiTAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(dim // num_heads), RMSNorm(dim // num_heads)

    def forward(self, x, cos, sin):
        N, T, D = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).unbind(2))
        q, k = rope(self.q_norm(q), cos, sin), rope(self.k_norm(k), cos, sin)  # (N, H, T, hd), fp32 (the tables)
        with torch.autocast(x.device.type, enabled=False):  # logits and softmax in fp32, as the official attention
            x = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(v.dtype)  # (N, H, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))

class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)

class JiTBlock(nn.Module):
    """SiT's adaLN-Zero block with RMSNorm, RoPE attention and a SwiGLU of 2/3 the width (the same parameter count)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = RMSNorm(dim), JiTAttention(dim, num_heads), RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(int(4 * dim) * 2 / 3))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (N, D)
        x = torch.addcmul(x, gate1.unsqueeze(1), self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin))
        return torch.addcmul(x, gate2.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift2, scale2)))

class BottleneckPatchEmbed(nn.Module):
    """Patches -> a narrow bottleneck (a linear map of each p x p x 3 patch, no bias) -> the width (a 1 x 1 conv)."""
    def __init__(self, input_size, patch_size, bottleneck, dim):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.proj1 = nn.Conv2d(3, bottleneck, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, dim, 1)

    def forward(self, x):
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"JiT was built for {self.input_size}x{self.input_size} images, got {tuple(x.shape)}")
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2).contiguous()  # (N, D, h, w) -> (N, T, D)

class JiT(nn.Module):
    """JiT with one projector per teacher on block encoder_depth's patch tokens (1-based; the in-context tokens are
    left out). Labels are dropped by the loss, not here: the label table's last row is the null label. The RoPE
    tables are buffers outside the state dict, so official checkpoints load strictly."""
    def __init__(self, input_size=256, patch_size=16, hidden_size=768, depth=12, num_heads=12, num_classes=1000,
                 bottleneck_dim=128, in_context_len=32, in_context_start=4, encoder_depth=8, z_dims=(768,),
                 projector='conv', proj_kernel=3, projector_dim=2048):
        super().__init__()
        if not 1 <= encoder_depth <= depth:
            raise UserError(f"encoder_depth must be in 1..{depth} (the aligned block), got {encoder_depth}")
        if input_size % patch_size:
            raise UserError(f"the image side {input_size} is not a multiple of the JiT patch {patch_size}")
        self.in_channels, self.patch_size, self.num_classes, grid = 3, patch_size, num_classes, input_size // patch_size
        self.encoder_depth, self.in_context_len, self.in_context_start = encoder_depth, in_context_len, in_context_start
        self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, bottleneck_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, dropout_prob=1.0)  # the null row; never drops here
        self.register_buffer('pos_embed', sincos_pos_embed(hidden_size, grid))  # fixed, (1, T, D)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, hidden_size) * 0.02)
        for name, extra in (('rope', 0), ('rope_ctx', in_context_len)):  # without and with the in-context tokens
            for suffix, table in zip(('_cos', '_sin'), rope_tables(hidden_size // num_heads, grid, extra)):
                self.register_buffer(name + suffix, table, persistent=False)
        self.blocks = nn.ModuleList([JiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.projectors = nn.ModuleList(Projector(projector, hidden_size, z, projector_dim, proj_kernel)
                                        for z in z_dims)  # one per teacher
        self.final_layer = FinalLayer(hidden_size, patch_size, 3)
        self.final_layer.norm_final = RMSNorm(hidden_size)
        self.grad_ckpt = False
        self.initialize_weights()

    initialize_weights, unpatchify = SiT.initialize_weights, SiT.unpatchify  # the same init and pixel layout

    def forward(self, z, t, y, align=True):
        """z (N, 3, H, W) at times t (N,) (1: clean) with labels y (N,) -> the predicted clean image (N, 3, H, W) and
        the projected patch tokens, one (N, T, z_dim) per teacher."""
        x = self.x_embedder(z) + self.pos_embed  # (N, T, D)
        y_emb = self.y_embedder(y, False)  # (N, D)
        c, ctx, projected = self.t_embedder(t) + y_emb, 0, []
        for i, block in enumerate(self.blocks):
            if self.in_context_len and i == self.in_context_start:  # the class tokens join in front
                ctx = self.in_context_len
                x = torch.cat([y_emb.unsqueeze(1) + self.in_context_posemb, x], dim=1)  # (N, ctx + T, D)
            cos, sin = (self.rope_ctx_cos, self.rope_ctx_sin) if ctx else (self.rope_cos, self.rope_sin)
            if self.grad_ckpt and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, cos, sin, use_reentrant=False,
                                                      preserve_rng_state=False)
            else:
                x = block(x, c, cos, sin)
            if align and i + 1 == self.encoder_depth:
                projected = [projector(x[:, ctx:]) for projector in self.projectors]
        return self.unpatchify(self.final_layer(x[:, ctx:], c)), projected

# depth, width, heads, bottleneck, in-context tokens, their first block, aligned block: the official factories (B, L,
# H at patch 16 or 32; main_jit.py's encoder_depth 8); T (tiny) is ours, for the CPU demo and tests, as SiT-T
JIT_SIZES = dict(T=(6, 192, 3, 32, 4, 2, 2), B=(12, 768, 12, 128, 32, 4, 8), L=(24, 1024, 16, 128, 32, 8, 8),
                 H=(32, 1280, 16, 256, 32, 10, 8))
JIT_MODELS = [f'JiT-{s}/{p}' for s in JIT_SIZES for p in (2, 4, 16, 32)]

def jit_args(name, **kwargs):
    """The constructor arguments of JiT `name` (JiT-B/16: size B, patch 16); None values take the size's default."""
    if name not in JIT_MODELS:
        raise UserError(f"unknown JiT model {name!r}; accepted: {', '.join(JIT_MODELS)}")
    size, patch = name[4:].split('/')
    keys = 'depth', 'hidden_size', 'num_heads', 'bottleneck_dim', 'in_context_len', 'in_context_start', 'encoder_depth'
    return dict(zip(keys, JIT_SIZES[size]), patch_size=int(patch)) | {k: v for k, v in kwargs.items() if v is not None}

def jit_loss(model, x, y, targets, cfg, null):
    """JiT's loss on images x in [-1, 1]: labels dropped to `null` at rate jit_label_drop, t logit-normal, noise, in
    this order (the official draws); the network predicts x from z_t, and the loss is the squared error of the
    velocities (x - z) / (1 - t) of truth and prediction, 1 - t clamped at t_eps (weights up to 400 near t = 1)."""
    y = torch.where(torch.rand(y.shape[0], device=y.device) < cfg.jit_label_drop, null, y)
    t = torch.sigmoid(torch.randn(x.shape[0], device=x.device) * cfg.jit_p_std + cfg.jit_p_mean).view(-1, 1, 1, 1)
    z = t * x + (1 - t) * (torch.randn_like(x) * cfg.jit_noise_scale)
    x_pred, projected = model(z, t.flatten(), y, align=bool(targets))
    w = (1 - t).clamp_min(cfg.jit_t_eps)
    flow = ((x - z) / w - (x_pred.float() - z) / w).square().mean()
    return dict(flow=flow, align=alignment_loss(projected, targets, x.device))

@torch.no_grad()
def jit_sample(model, noise, y, method='heun', num_steps=50, cfg_scale=1.0, low=0.0, high=1.0, t_eps=0.05):
    """Images in [-1, 1] from `noise` (t = 0), the official sampler: t on linspace(0, 1, num_steps + 1) in float32,
    Heun or Euler steps with the last one Euler (t = 1 is never evaluated). Guidance acts on the x-prediction with
    the null label, on while low < t < high (no lower bound when low is 0), judged in float32 as the official code
    does (at 50 steps, t = 0.099999994 counts as <= 0.1); off, the network runs once, conditional."""
    if model.training:
        raise ValueError("sample with the model in eval mode (the EMA model)")
    if method not in ('euler', 'heun'):
        raise UserError(f"a JiT samples with --mode heun or euler, not {method!r}")
    ts = torch.linspace(0, 1, num_steps + 1)  # on the host: the guidance decisions read no device value
    tt, y_null = ts.to(noise.device), torch.full_like(y, model.num_classes)

    def velocity(z, i):  # z (B, 3, H, W) fp32 at time ts[i] -> (B, 3, H, W)
        t = tt[i].expand(z.shape[0])
        guided = cfg_scale != 1.0 and not (ts[i] >= high or (low != 0 and ts[i] <= low))
        z_in, t_in, y_in = (torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, y_null])) if guided else (z, t, y)
        x = model(z_in, t_in, y_in, align=False)[0].float()
        if guided:
            x_cond, x_uncond = x.chunk(2)
            x = x_uncond + cfg_scale * (x_cond - x_uncond)
        return (x - z) / (1 - t.view(-1, 1, 1, 1)).clamp_min(t_eps)

    z = noise.float()
    for i in range(num_steps):
        dt = tt[i + 1] - tt[i]
        v = velocity(z, i)
        if method == 'heun' and i < num_steps - 1:
            v = 0.5 * (v + velocity(z + dt * v, i + 1))
        z = z + dt * v
    return z

class JiTFlow(Flow):
    """JiT's unit: the network and two EMAs (the first samples), AdamW with lr = jit_blr x batch / 256 (or --lr)
    after a linear warm-up of jit_warmup_epochs, set every step (a host float: no sync), no gradient clipping
    (grad_clip 0), and a random horizontal flip per image and step (the teachers see the flipped image too)."""
    def __init__(self, cfg, run):
        self.cfg, self.norm, self.autocast, self.n = cfg, None, run.autocast, 0  # n: steps taken (the lr schedule)
        args = jit_args(cfg.model, input_size=cfg.resolution, num_classes=run.data.num_classes,
                        encoder_depth=cfg.encoder_depth, projector=cfg.projector, proj_kernel=cfg.proj_kernel,
                        projector_dim=cfg.projector_dim)
        teachers = run.load_teachers(grid=cfg.resolution // args['patch_size'])  # the JiT patch grid
        self.model_args = args | dict(z_dims=[t.dim for t in teachers])
        self.model = JiT(**self.model_args).to(run.device)
        self.model.grad_ckpt = cfg.grad_ckpt
        self.ema, self.ema2 = (copy.deepcopy(self.model).requires_grad_(False).eval() for _ in range(2))
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.jit_blr * cfg.global_batch_size / 256
        self.warmup = cfg.jit_warmup_epochs * max(1, len(run.data) // cfg.global_batch_size)  # steps
        self.opt = adamw(self.model.parameters(), self.peak_lr, cfg.adam_beta2)
        self.train_model = run.wrap(self.model)
        self.saved = dict(model=self.model, ema=self.ema, ema2=self.ema2, opt=self.opt, schedule=self)

    def state_dict(self):  # the schedule's place: checkpoints keep it (saved['schedule'])
        return dict(steps=self.n)

    def load_state_dict(self, state):
        self.n = state['steps']

    def transform(self, img):  # (B, 3, R, R) uint8, each image flipped left-right with probability 1/2
        return torch.where(torch.rand(img.shape[0], 1, 1, 1, device=img.device) < 0.5, img.flip(-1), img)

    def loss(self, x, y, targets):  # x: the images in [-1, 1] (model_input, pixel space)
        with self.autocast:
            return jit_loss(self.train_model, x, y, targets, self.cfg, self.model.num_classes)

    def step(self, img, moments, y, targets):
        """Flow's step (loss, AdamW without clipping, the first EMA) at the schedule's lr, then the second EMA."""
        for group in self.opt.param_groups:  # the official schedule: lr 0 at the first step, peak after warm-up
            group['lr'] = self.peak_lr * min(1.0, self.n / self.warmup) if self.warmup else self.peak_lr
        self.n += 1
        stats = super().step(img, moments, y, targets)
        ema_update(self.ema2, self.model, self.cfg.jit_ema_decay2)
        return stats

    @torch.no_grad()
    def preview(self, noise, y, eps=None):
        steps, cfg_scale = PREVIEW[self.cfg.preview]
        with self.autocast:
            return jit_sample(self.ema, noise, y, self.cfg.preview, steps, cfg_scale, t_eps=self.cfg.jit_t_eps)

# The training unit of each objective (a recipe row's `objective`)
OBJECTIVES = {'flow': Flow, 'repa-e': REPAE, 'meanflow': MeanFlow, 'jit': JiTFlow}
# =====================================================================================================================
# Part 3. The paper's study: a teacher's spatial metrics and linear probe, their correlation with FID, the spatial norm
@functools.lru_cache(maxsize=8)
def pair_sets(H, device, far_dist, dmax, d_pos, d_neg, lds='code'):
    """The fixed sets of token pairs (i, j) on an H x H row-major grid that the metrics average K over, by Manhattan
    distance d: the columns of `sets` (T*T, 2 + len(ds)) flag LDS's near and far pairs (lds 'code': d = 1 and
    d >= far_dist; 'paper': 1 <= d < H/2 and d >= H/2) and each d of ds (1..dmax, those the grid has), so
    K (B, T*T) @ sets / sizes is every per-set mean in one matmul; near and far (T, T) flag SRSS's windows
    1 <= d <= d_pos and d >= d_neg."""
    T = H * H
    rc = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing='ij'), -1).view(T, 2)
    dist = (rc[:, None] - rc[None]).abs().sum(-1)  # (T, T)
    ds = [d for d in range(1, dmax + 1) if (dist == d).any()]
    lds_sets = [dist == 1, dist >= far_dist] if lds == 'code' else [(dist >= 1) & (2 * dist < H), 2 * dist >= H]
    sets = torch.stack(lds_sets + [dist == d for d in ds], -1).flatten(0, 1).float()  # (T*T, n)
    near, far = ((dist >= 1) & (dist <= d_pos)).float(), (dist >= d_neg).float()
    return ds, sets.to(device), sets.sum(0).clamp(min=1).to(device), near.to(device), far.to(device)

@torch.no_grad()
def spatial_metrics(tokens, masks=None, far_dist=6, dmax=8, d_pos=1, d_neg=6, chunk=None, lds='code'):
    """Per-image LDS, CDS, SRSS and RMSC of tokens (B, T, D) on a square, row-major grid: a dict of (B,) tensors.
    K is the cosine similarity of two tokens, d their Manhattan distance on the grid.
    LDS  = mean K over 4-neighbours - mean K over pairs with d >= far_dist (lds='code', the official code's, which
           gave the paper's correlations); lds='paper': the paper's text, near 1 <= d < H/2, far d >= H/2.
    CDS  = -slope of the least-squares line through (d, mean K at distance d), d = 1..dmax.
    SRSS = mean over foreground anchors of [mean K to foreground tokens at d <= d_pos - mean K to background tokens at
           d >= d_neg]; NaN without masks, with < 2 foreground or no background tokens (average it with nanmean).
    RMSC = sqrt(mean over tokens of |x - mean_T x|^2) for the L2-normalized tokens x; in [0, 1].
    Every mean over a fixed set of pairs is a matmul against that set (pair_sets), not a boolean gather. On a CPU the
    images go `chunk` at a time (default: 1 MiB of K), so the passes over K stay in the cache."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, T, D), got shape {tuple(tokens.shape)}")
    B, T, _ = tokens.shape
    H = math.isqrt(T)
    if H * H != T:
        raise ValueError(f"the tokens must lie on a square grid, got T={T} (not a square number)")
    if lds not in ('code', 'paper'):
        raise ValueError(f"lds: 'code' (the official code's definition) or 'paper' (the paper's text), not {lds!r}")
    if masks is not None and tuple(masks.shape) != (B, T):
        raise ValueError(f"masks must be (B, T) = {(B, T)} foreground flags, one per token; got {tuple(masks.shape)}")
    chunk = chunk or (B if tokens.is_cuda else max(1, 2 ** 18 // (T * T)))
    if B > chunk:
        parts = [spatial_metrics(tokens[i: i + chunk], None if masks is None else masks[i: i + chunk], far_dist, dmax,
                                 d_pos, d_neg, chunk, lds) for i in range(0, B, chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ds, sets, sizes, near, far = pair_sets(H, tokens.device, far_dist, dmax, d_pos, d_neg, lds)
    u = F.normalize(tokens.float(), dim=-1, eps=1e-8)
    K = u @ u.transpose(1, 2)  # (B, T, T)
    M = K.view(B, T * T) @ sets / sizes  # (B, 2 + len(ds)): mean K over LDS's near and far pairs, at each d of ds
    S = M[:, 2:]  # (B, len(ds)) mean similarity at each distance
    x0 = torch.tensor(ds, dtype=S.dtype, device=S.device) - sum(ds) / len(ds)  # centred distances
    out = {'lds': M[:, 0] - M[:, 1], 'cds': -((S - S.mean(1, keepdim=True)) @ x0) / (x0 @ x0).clamp(min=1e-12)}
    if masks is None:
        out['srss'] = torch.full((B,), float('nan'), device=tokens.device)
    else:
        fg = masks.bool().to(tokens.device)  # (B, T)
        f, b = fg.float(), (~fg).float()
        n_pos, n_neg = f @ near, b @ far  # (B, T): per anchor, foreground partners near, background partners far
        pos = ((K * near) @ f[:, :, None]).squeeze(2)  # (B, T) sums of K over those partners
        neg = ((K * far) @ b[:, :, None]).squeeze(2)
        delta = pos / n_pos.clamp(min=1) - neg / n_neg.clamp(min=1)
        valid = fg & (n_pos > 0) & (n_neg > 0)
        srss = (delta * valid).sum(1) / valid.sum(1)  # 0/0 = NaN when no anchor qualifies
        out['srss'] = srss.masked_fill((fg.sum(1) < 2) | ((~fg).sum(1) < 1), float('nan'))
    out['rmsc'] = (u - u.mean(1, keepdim=True)).square().sum(-1).mean(1).sqrt()
    return out

def patch_masks(masks, grid):
    """Pixel masks (B, R, R) -> token masks (B, grid*grid): a patch is foreground if any of its pixels is (official)."""
    return F.max_pool2d(masks[:, None].float(), masks.shape[-1] // grid).flatten(1).bool()  # row-major

def image_mask(data, i, masks_dir):
    """Foreground mask (R, R) of image i: the synthetic set knows its shapes; a folder needs masks_dir/<path>.png."""
    if data.files is None:
        return synthetic_image(i, data.resolution, data.num_classes, data.seed)[2]
    rel = Path(data.files[i]).with_suffix('.png')
    for p in (Path(masks_dir) / rel, Path(masks_dir) / rel.name):
        if p.exists():
            return center_crop(p, data.resolution, 'L') > 0
    raise UserError(f"no mask for {data.files[i]}: expected {Path(masks_dir) / rel} (any mode, > 0 = foreground)")

def linear_probe(pooled, labels, steps=200, val_frac=0.2, seed=0):
    """Held-out accuracy of a logistic regression (standardized features, L-BFGS, L2 1e-4) on (N, D) features."""
    perm = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(seed))
    k = max(1, int(len(pooled) * val_frac))
    val, tr = perm[:k], perm[k:]
    x = pooled.double()
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    lin = nn.Linear(x.shape[1], int(labels.max()) + 1).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, history_size=10, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x[tr]), labels[tr]) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return (lin(x[val]).argmax(1) == labels[val]).double().mean().item()

# -----------------------------------------------------------------------------
# FID and IS as ADM's evaluator computes them, on Inception features (encoders.FIDInception): fid.py's evaluation
# and the one while training (Run.evaluate) share them
def compute_stats(feats, device='cpu'):
    """mu and the unbiased covariance (np.cov(rowvar=False)) of (N, D) features, in float64."""
    x = torch.as_tensor(feats, device=device).double()
    mu = x.mean(0)
    x = x - mu
    sigma = x.T @ x / (len(x) - 1)  # (D, D)
    return mu.cpu().numpy(), sigma.cpu().numpy()

def _sqrtm(a):
    from scipy import linalg  # 0.2 s to import: only for ADM's own method
    out = linalg.sqrtm(a)  # no `disp`: deprecated in scipy 1.16 and removed in 1.18; older versions may return a tuple
    return out[0] if isinstance(out, tuple) else out

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method='eigh'):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) in float64.

    method 'sqrtm' is ADM's (TTUR's) computation line by line: scipy's sqrtm of the non-symmetric S1 S2, with its eps
    and imaginary-part fallbacks. 'eigh' (default) gets the same trace from symmetric eigendecompositions,
    tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), since both products have the same eigenvalues: it agrees with
    sqrtm to ~1e-12 on full-rank statistics, stays exact on singular ones, and is several times faster (sqrtm takes
    minutes on 2048 x 2048 singular covariances on a small CPU).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'statistics of different sizes: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}')
    diff = mu1 - mu2
    if method == 'eigh':
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(w.clip(0))) @ v.T  # S1^1/2, symmetric
        tr_covmean = np.sqrt(np.linalg.eigvalsh(root @ sigma2 @ root).clip(0)).sum()
        return never_negative(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, sigma1, sigma2)
    if method != 'sqrtm':
        raise ValueError(f"method must be 'eigh' or 'sqrtm' (ADM's), got {method!r}")
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product (fewer images than dimensions)
        warnings.warn(f'fid calculation produces singular product; adding {eps} to diagonal of cov estimates')
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical noise gives a small imaginary part; a large one means a broken sqrtm
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'Imaginary component {np.abs(covmean.imag).max()}')
        covmean = covmean.real
    return never_negative(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean), sigma1, sigma2)

def never_negative(d, sigma1, sigma2):
    """A squared distance is >= 0, but two equal sets give 0 only up to rounding, of either sign (-1.3e-6 was seen):
    an eigenvalue that is 0 in exact arithmetic comes out as +-eps ||S||, and its square root, up to
    sqrt(eps ||S||), enters tr sqrt(S1 S2) once per dimension. A negative value within that noise is 0; anything more
    negative is a fault and stays visible."""
    noise = 2 * len(sigma1) * np.sqrt(np.finfo(np.float64).eps * max(np.trace(sigma1), np.trace(sigma2), 0.0))
    return float(0.0 if -noise <= d < 0 else d)

def inception_score(logits, split_size=5000, probs=False):
    """ADM's IS: the mean over consecutive, unshuffled splits of exp(mean_i KL(p_i || mean_j p_j)), in float64.
    `logits` (N, C) are pool3 @ fc.weight.T (no bias); pass probabilities with probs=True. IS grows with the split
    size and depends on the order (a class-sorted file scores lower), so only ADM's split of 5000 is comparable."""
    x = torch.as_tensor(logits, dtype=torch.float64)
    if len(x) < split_size:
        raise UserError(f'Inception Score needs at least one split of {split_size} samples (ADM uses 5000); '
                        f'got {len(x)}. Use a smaller split only for smoke tests: its numbers are not comparable')
    logp = x.log() if probs else x.log_softmax(1)
    scores = []
    for part in logp.split(split_size):  # (<= split_size, C); the last split may be shorter (12345 -> 5000/5000/2345)
        p = part.exp()
        log_mean = p.mean(0).log()
        kl = torch.where(p > 0, p * (part - log_mean), 0.0).sum(1)  # 0 log 0 = 0
        scores.append(kl.mean().exp())
    return torch.stack(scores).mean().item()

STUDY_HELP = dict(  # the training flags the study commands share, as these commands use them
    encoder='the teacher (python encoders.py --list)', spnorm_gamma='share of the token mean the z-score removes',
    encoder_weights="'auto' (Hugging Face hub and its cache), a local file, or 'random[:BLOCKS]' (tests)",
    data_path='ImageNet-style folder (<root>/<class>/*.JPEG) of the images to measure; none: the synthetic set',
    resolution='image side in pixels', num_classes='classes of the synthetic set', synthetic_size='its images',
    siglip_norm="SigLIP's input stats: the paper's ImageNet ones or SigLIP's 0.5/0.5", device="'auto', 'cuda' or 'cpu'",
    seed='which images are drawn (and a random teacher)',
    out_dir='where the token cache and <teacher>.json go')

def study_parser(prog, doc, shared=(), **defaults):
    """The parser of a study command, with the training flags it shares (same names and defaults, help written for
    these commands) and its own."""
    p = ArgumentParser(prog=f'irepa.py {prog}', description=doc, allow_abbrev=False)
    for k in shared:
        v = defaults.get(k, DEFAULTS.get(k))
        p.add_argument('--' + k.replace('_', '-'), default=v, help=f'{STUDY_HELP[k]} (default {v})',
                       choices=CHOICES.get(k), type=TYPES.get(k) or type(v))
    return p

def existing_file(path):
    """An input file's argparse type: a missing one is argparse's one error line, not a traceback later."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path

def existing_folder(path):
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"no such folder: {path}")
    return path

def teacher_tokens(a, data, idx, grid, device):
    """The teacher's tokens (n, T, D) of the images idx, through a teacher cache in a.out_dir (one per teacher, weights,
    images and settings; any other difference is refused by name); and the extraction speed (None when cached)."""
    name, t0 = encoders.resolve_teacher(a.encoder), time.time()
    key = f"{name}|{a.encoder_weights}|{dataset_fingerprint(data, idx)}|{a.resolution}|{grid}|{a.seed}|{a.siglip_norm}"
    path = Path(a.out_dir) / f"{name}-{int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 ** 10:010d}"
    cached = (path / 'meta.json').exists()
    torch.manual_seed(a.seed)  # a random teacher (tests) is then the same one every run
    teacher = encoders.load_teacher(name, a.encoder_weights, grid, device,
                                    torch.bfloat16 if device.type == 'cuda' else None, siglip_norm=a.siglip_norm)
    settings = argparse.Namespace(precision='bf16' if device.type == 'cuda' else 'fp32', resolution=a.resolution,
                                  num_workers=min(4, os.cpu_count() or 1), siglip_norm=a.siglip_norm)
    (tokens,), (dtype,) = teacher_cache(path, settings, data, [teacher], a.batch_size, device, idx)
    print(f"features from the cache {path}" if cached else f"features cached in {path}")
    return torch.from_numpy(np.array(tokens)).view(dtype), None if cached else len(idx) / (time.time() - t0)

def measure_teacher(argv):
    """python irepa.py metrics --encoder dinov2 [--data-path DIR --masks DIR]: LDS, CDS, SRSS, RMSC and LP accuracy."""
    p = study_parser('metrics', measure_teacher.__doc__, ('encoder', 'encoder_weights', 'data_path', 'resolution',
                     'num_classes', 'synthetic_size', 'siglip_norm', 'seed', 'device', 'out_dir'),
                     out_dir='out/metrics')
    p.add_argument('--masks', default=None, type=existing_folder,
                   help='folder of foreground masks, same relative paths as the images (.png)')
    p.add_argument('--grid', type=int, default=None,
                   help='token grid of the teacher; default resolution / 16 (the SiT grid)')
    p.add_argument('--num-images', type=int, default=1000, help='images measured, at most the dataset (default 1000)')
    p.add_argument('--batch-size', type=int, default=32, help='images per teacher forward (default 32)')
    p.add_argument('--lp-steps', type=int, default=200,
                   help='L-BFGS iterations of the linear probe (0: no probe; default 200)')
    p.add_argument('--lds', default='code', choices=('code', 'paper'), help="LDS's pairs: 'code' (the official code's, "
                   "behind the paper's correlations): d = 1 vs d >= 6; 'paper' (its text): d < H/2 vs d >= H/2")
    a = p.parse_args(argv)
    device = torch_device(a.device)
    use_device(device)
    grid, name = a.grid or a.resolution // 16, encoders.resolve_teacher(a.encoder)
    data = ImageData(a.data_path, a.resolution, a.num_classes, a.seed, a.synthetic_size)
    n = min(a.num_images, len(data))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(a.seed))[:n].sort().values.tolist()
    tokens, extract_rate = teacher_tokens(a, data, idx, grid, device)
    masks = None
    if a.masks or data.files is None:
        masks = patch_masks(torch.from_numpy(np.stack([image_mask(data, i, a.masks) for i in idx])), grid)
        few = (masks.sum(1) < grid * grid // 4) | ((~masks).sum(1) < grid * grid // 4)
        masks[few] = False  # SRSS where a quarter of the patches are foreground and a quarter background (16x16: 64)
    t0 = time.time()
    per = {k: torch.cat(v) for k, v in zip(('lds', 'cds', 'srss', 'rmsc'), zip(*[
        spatial_metrics(tokens[i: i + 64].to(device), None if masks is None else masks[i: i + 64].to(device),
                        lds=a.lds).values() for i in range(0, n, 64)]))}
    summary = dict(teacher=name, images=n, resolution=a.resolution, grid=grid, lds_pairs=a.lds,
                   extract_img_per_s=extract_rate, metrics_img_per_s=n / (time.time() - t0))
    labels = torch.as_tensor(data.labels[idx])
    summary['lp'] = linear_probe(tokens.float().mean(1), labels, a.lp_steps, seed=a.seed) \
        if a.lp_steps and len(labels.unique()) > 1 else None
    print(f"{name}: {n} images at {a.resolution} px, {grid}x{grid} tokens")
    for k, v in per.items():
        ok = v.cpu().double()[~v.cpu().isnan()]
        summary |= {k: ok.mean().item() if len(ok) else float('nan'), k + '_n': len(ok),
                    k + '_std': ok.std().item() if len(ok) > 1 else float('nan')}
        print(f"  {k.upper():5s} {summary[k]:+.4f} +- {summary[k + '_std']:.4f}  ({len(ok)} images)")
    out = Path(a.out_dir) / f'{name}.json'
    atomic_text(out, json.dumps(summary, indent=1))  # complete or absent: run.sh skips a measured teacher
    print(f"  LP    {'n/a (one class)' if summary['lp'] is None else round(summary['lp'], 4)}\n  speed: tokens "
          f"{'cached' if extract_rate is None else f'{extract_rate:.1f} img/s'}, metrics "
          f"{summary['metrics_img_per_s']:.1f} img/s; summary in {out}")
    return summary

def correlate(argv):
    """python irepa.py correlate results.csv: Pearson and Spearman r of LP, LDS, CDS, SRSS, RMSC with FID; a panel."""
    p = study_parser('correlate', correlate.__doc__)
    p.add_argument('csv', type=existing_file,
                   help='columns teacher, fid, lp, lds, cds, srss, rmsc (any case, any order, more allowed)')
    p.add_argument('--out', default=None, help='scatter panel PNG (default: next to the CSV)')
    a = p.parse_args(argv)
    from scipy import stats  # seconds to import: after the arguments are checked
    with open(a.csv, newline='') as f:
        rows = [{k.strip().lower(): v for k, v in r.items() if k} for r in csv.DictReader(f)]
    need = ['teacher', 'fid', 'lp', 'lds', 'cds', 'srss', 'rmsc']
    if missing := [c for c in need if not rows or c not in rows[0]]:
        raise UserError(f"{a.csv} lacks the column(s) {', '.join(missing)}; it needs {', '.join(need)}")
    if len(rows) < 3:
        raise UserError(f"{a.csv} has {len(rows)} row(s); a correlation needs at least 3 teachers")
    num = lambda v: float(v) if v.strip() not in ('', 'nan', 'NaN', 'None') else float('nan')
    fid = np.array([num(r['fid']) for r in rows])
    columns, result = {m: np.array([num(r[m]) for r in rows]) for m in need[2:]}, {}
    print(f"{len(rows)} teachers; correlation with FID (rows with a missing value are left out of that measure)")
    print(f"  {'measure':8s} {'Pearson r':>10s} {'Spearman r':>11s} {'n':>4s}")
    for m, x in columns.items():
        ok = np.isfinite(x) & np.isfinite(fid)
        result[m] = dict(pearson=float('nan'), spearman=float('nan'), n=int(ok.sum()))
        if ok.sum() >= 3 and np.ptp(x[ok]) > 0:
            result[m].update(pearson=float(np.corrcoef(x[ok], fid[ok])[0, 1]),
                             spearman=float(stats.spearmanr(x[ok], fid[ok])[0]))
        print(f"  {m.upper():8s} {result[m]['pearson']:+10.3f} {result[m]['spearman']:+11.3f} {result[m]['n']:4d}")
    out = a.out or str(Path(a.csv).with_suffix('.png'))
    scatter_panel(columns, fid, result, out)
    print(f"scatter panel: {out}")
    return result

def scatter_panel(columns, fid, result, out, W=320, H=300, pad=46):
    """One scatter plot of FID against each measure, with its least-squares line and r, side by side in one PNG."""
    img = Image.new('RGB', (W * len(columns), H), 'white')
    d, f12, f14 = ImageDraw.Draw(img), ImageFont.load_default(12), ImageFont.load_default(15)
    for i, (m, x) in enumerate(columns.items()):
        ok, ox = np.isfinite(x) & np.isfinite(fid), i * W
        d.rectangle([ox + pad, 30, ox + W - 12, H - pad], outline='black')
        d.text((ox + pad, 8), f"{m.upper()}   r = {result[m]['pearson']:+.3f}", fill='black', font=f14)
        d.text((ox + W // 2 - 10, H - 20), m.upper(), fill='black', font=f12)
        if ok.sum() < 2:
            continue
        (x0, x1), (y0, y1) = [(v.min() - 0.06 * np.ptp(v) - 1e-9, v.max() + 0.06 * np.ptp(v) + 1e-9)
                              for v in (x[ok], fid[ok])]  # the axes' ends
        px = lambda v: ox + pad + (v - x0) / (x1 - x0) * (W - 12 - pad)
        py = lambda v: H - pad - (v - y0) / (y1 - y0) * (H - pad - 30)
        for xy, v in (((px(x0), H - pad + 4), x0), ((px(x1) - 40, H - pad + 4), x1), ((ox + 2, py(y0) - 7), y0),
                      ((ox + 2, py(y1) - 7), y1)):  # the ends of both axes
            d.text(xy, f'{v:.3g}', fill='black', font=f12)
        if np.ptp(x[ok]) > 0:
            k, b = np.polyfit(x[ok], fid[ok], 1)  # the least-squares line, clipped to the box where y leaves it
            ends = [((ye - b) / k if k else xe, ye) for xe in (x0, x1) for ye in [min(max(k * xe + b, y0), y1)]]
            d.line([px(ends[0][0]), py(ends[0][1]), px(ends[1][0]), py(ends[1][1])], fill=(214, 39, 40), width=2)
        for xv, yv in zip(x[ok], fid[ok]):
            d.ellipse([px(xv) - 4, py(yv) - 4, px(xv) + 4, py(yv) + 4], fill=(31, 119, 180))
    d.text((4, H // 2 - 40), 'FID', fill='black', font=f12)
    img.save(out)

def colormap(x):
    """Values in [0, 1] (any shape) -> uint8 RGB through viridis' anchor colours."""
    anchors = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]).float()
    x = x.clamp(0, 1) * (len(anchors) - 1)
    lo = x.floor().long().clamp(max=len(anchors) - 2)
    w = (x - lo)[..., None]
    return ((1 - w) * anchors[lo] + w * anchors[lo + 1]).round().to(torch.uint8)

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]

def line_panel(d, box, series, title, font):
    """One chart in box (x0, y0, x1, y1): each (xs, ys, colour) of `series` a polyline, the axes' ends written."""
    (x0, y0, x1, y1), pts = box, [(x, y) for xs, ys, _ in series for x, y in zip(xs, ys)]
    d.rectangle(box, outline='black')
    d.text((x0, y0 - 15), title, fill='black', font=font)
    if not pts:
        return
    (lx, hx), (ly, hy) = [(min(v), max(v) if max(v) > min(v) else min(v) + 1) for v in zip(*pts)]
    xy = lambda x, y: (x0 + (x - lx) / (hx - lx) * (x1 - x0), y1 - (y - ly) / (hy - ly) * (y1 - y0))
    for (x, y), v in (((x0, y1 + 3), lx), ((x1 - 40, y1 + 3), hx), ((x0 - 48, y1 - 12), ly), ((x0 - 48, y0), hy)):
        d.text((x, y), f'{v:.3g}', fill='black', font=font)
    for xs, ys, colour in series:
        line = [xy(x, y) for x, y in zip(xs, ys)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for px, py in line if len(line) <= 40 else []:  # few points (FID): each one visible
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)

def plot_curves(runs, out, W=300, H=220, pad=52):
    """The runs' log.jsonl in one PNG: flow loss, alignment loss, gradient norm(s) and FID against steps, FID against
    GPU-hours, the runs overlaid, a colour each (the legend). `plot` draws it; a training run refreshes its own."""
    logs = [[json.loads(line) for line in open(Path(r) / 'log.jsonl') if line.strip()] for r in runs]
    grads = sorted({k for log in logs for r in log for k in r if k.startswith('grad_norm')})
    panels = [('flow', 'step'), ('align', 'step'), *[(g, 'step') for g in grads], ('fid', 'step'), ('fid', 'gpu_hours')]
    cols, font = 3, ImageFont.load_default(12)
    img = Image.new('RGB', (W * cols, 24 + H * -(-len(panels) // cols)), 'white')
    d = ImageDraw.Draw(img)
    for j, r in enumerate(runs):  # the legend: each run's folder in its colour
        d.text((8 + j * W * cols // len(runs), 4), Path(r).resolve().name, fill=COLORS[j % len(COLORS)], font=font)
    for i, (y, x) in enumerate(panels):
        ox, oy = i % cols * W, 24 + i // cols * H
        series = [([r[x] for r in ok], [r[y] for r in ok], COLORS[j % len(COLORS)]) for j, log in enumerate(logs)
                  for ok in [[r for r in log if r.get(x) is not None and r.get(y) is not None and math.isfinite(r[y])]]]
        line_panel(d, (ox + pad, oy + 22, ox + W - 10, oy + H - 22), series, f'{y} vs {x}', font)
    atomic_write(out, lambda f: img.save(f, format='png'))

def plot(argv):
    """python irepa.py plot RUN [RUN ...]: the runs' curves in one PNG (REPA vs iREPA: the convergence figure)."""
    p = study_parser('plot', plot.__doc__)
    p.add_argument('runs', nargs='+', type=existing_folder, help='run folders (--out-dir), each with its log.jsonl')
    p.add_argument('--out', default='curves.png', help='the PNG')
    a = p.parse_args(argv)
    if missing := [r for r in a.runs if not (Path(r) / 'log.jsonl').is_file()]:
        raise UserError(f"no log.jsonl in {', '.join(missing)}: plot reads the runs' logs")
    plot_curves(a.runs, a.out)
    print(f"curves of {len(a.runs)} run(s): {a.out}")

@torch.no_grad()
def spnorm_viz(argv):
    """python irepa.py spnorm-viz --encoder dinov2 [--image IMG]: a token's cosine similarity, before and after."""
    p = study_parser('spnorm-viz', spnorm_viz.__doc__, ('encoder', 'encoder_weights', 'resolution', 'spnorm_gamma'),
                     spnorm_gamma=RECIPES['irepa']['spnorm_gamma'])
    p.add_argument('--image', default=None, type=existing_file,
                   help='an image file (center-cropped); default: a synthetic image')
    p.add_argument('--index', type=int, default=3, help='which synthetic image, without --image (default 3)')
    p.add_argument('--token', default=None, help='row,col of the query token on the grid (default: the centre)')
    p.add_argument('--out', default='out/spnorm-viz.png', help='the picture (PNG)')
    a = p.parse_args(argv)
    grid = a.resolution // 16
    img = center_crop(a.image, a.resolution) if a.image else synthetic_image(a.index, a.resolution, 10)[0]
    row, col = map(int, a.token.split(',')) if a.token else (grid // 2, grid // 2)
    if not (0 <= row < grid and 0 <= col < grid):
        raise UserError(f"--token {row},{col} is outside the {grid}x{grid} grid")
    teacher = encoders.load_teacher(a.encoder, a.encoder_weights, grid)
    tokens = teacher(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255).float()  # (1, T, D)
    R, cell = a.resolution, a.resolution // grid
    panels = [torch.from_numpy(img)]
    for t in (tokens, spatial_norm(tokens, a.spnorm_gamma)):
        u = F.normalize(t[0], dim=-1)
        sim = (u @ u[row * grid + col]).view(grid, grid)  # cosine similarity to the query token
        panels.append(colormap((sim + 1) / 2).repeat_interleave(cell, 0).repeat_interleave(cell, 1))  # (R, R, 3)
    canvas = Image.new('RGB', (3 * R, R + 24), 'white')
    canvas.paste(Image.fromarray(torch.cat(panels, 1).numpy()), (0, 24))
    d = ImageDraw.Draw(canvas)
    for k, title in enumerate(['image', f'{teacher.name}: cos sim', f'after spatial z-score (gamma {a.spnorm_gamma})']):
        d.text((k * R + 4, 4), title, fill='black', font=ImageFont.load_default(13))
        d.rectangle([k * R + col * cell, 24 + row * cell, k * R + (col + 1) * cell - 1, 24 + (row + 1) * cell - 1],
                    outline='red', width=2)  # the query token
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(a.out)
    lds = [spatial_metrics(t)['lds'].item() for t in (tokens, spatial_norm(tokens, a.spnorm_gamma))]
    print(f"token ({row}, {col}); LDS of this image {lds[0]:+.4f} before, {lds[1]:+.4f} after the z-score; "
          f"picture: {a.out}")
    return lds


# =====================================================================================================================
# Part 4. Running at scale: what a one-GPU, never-preempted run on clean data does not need, behind `Run`
# =====================================================================================================================
# A run stopped by SIGTERM/SIGINT (preemption) or --time-limit exits with this code once its checkpoint is written:
# EX_TEMPFAIL of sysexits.h, "temporary failure, try again": requeue the job with --resume. 2 is a user error.
PREEMPTED = 75
GRAD_FLOOR_INTERVALS = 3  # a gradient norm under --grad-floor for this many log intervals in a row is a warning
PREVIEW_IMAGES, PREVIEW_COLS = 16, 8  # the grids drawn while training
PREPARE_SHARD = 4096  # images per unit of a sharded pass: a stopped pass redoes at most one per process
# dense bf16 FLOP/s per GPU, matched in order against torch.cuda.get_device_name(): specific names first
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200 NVL': 835e12, 'H200': 989e12,
                   'H800': 989e12, 'GH200': 989e12, 'B200': 2250e12, 'A100': 312e12, 'A800': 312e12, 'L40S': 362e12,
                   'RTX 4090': 165e12}

# -----------------------------------------------------------------------------
# Devices and processes
def torch_device(name):
    """--device -> this process's torch.device, indexed on CUDA ('cuda': cuda:LOCAL_RANK under torchrun, else cuda:0;
    'auto': CUDA if there is one): the one place that reads the flag, the rest asks .type."""
    name = ('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UserError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    if device.type == 'cpu':
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}, CUDA "
                        f"{torch.version.cuda or 'none: a CPU build'}); use --device cpu")
    local, n = int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count()
    index = local if device.index is None else device.index
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and index != local:  # two ranks on one GPU: NCCL would hang
        raise UserError(f"--device {name} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda")
    if index >= n:
        raise UserError(f"--device {name}: this machine has {n} CUDA device{'s' * (n != 1)}"
                        f"{f' (cuda:0 to cuda:{n - 1})' if n else ''}")
    return torch.device('cuda', index)

def tf32(on, conv=True):
    """TF32 for fp32 matmuls and (conv=True) cuDNN convolutions: True, False, or a list this returned before (the
    settings it replaced)."""
    flags = [torch.backends.cuda.matmul, torch.backends.cudnn.conv][:2 if conv else 1]
    before = [f.fp32_precision for f in flags]
    for f, v in zip(flags, on if isinstance(on, list) else ['tf32' if on else 'ieee'] * len(flags)):
        f.fp32_precision = v
    return before

def use_device(device):
    """A process's CUDA device and TF32, before anything runs there (and before NCCL, which binds to it)."""
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        tf32(True)

def dist_info():
    """(rank, world size, local rank): from torchrun's environment, or a single process without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))
    return 0, 1, 0

_cpu_groups = []  # [(the default process group, its gloo twin)]: made once per process group

def cpu_group():
    """A gloo group over all ranks, made once per process group (a collective: every rank calls it at the same point).
    Waits and flags go through it: a rank waiting in an NCCL collective is killed by its watchdog after 10 minutes."""
    if not _cpu_groups or _cpu_groups[0][0] is not dist.group.WORLD:
        _cpu_groups[:] = [(dist.group.WORLD, dist.new_group(backend='gloo'))]
    return _cpu_groups[0][1]

def barrier():
    """Every rank waits here for all the others, on the gloo group (off the GPU); nothing in one process."""
    if dist_info()[1] > 1:
        dist.barrier(group=cpu_group())

def compiler_missing(device):
    """What torch.compile's inductor lacks on this device type, or None: Triton on CUDA, a C++ compiler on CPU."""
    if device == 'cuda':
        import torch.utils._triton
        return None if torch.utils._triton.has_triton() else 'Triton (pip install triton) for CUDA kernels'
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()  # looks for $CXX or g++ on the PATH
    except Exception as e:
        return f'a C++ compiler for CPU kernels (g++, or one named by $CXX): {e}'.strip()
    return None

def sit_train_flops(model):
    """Training FLOPs per image, 6 (12 L D^2 T + 2 L T^2 D): the token-wise matmuls and attention, x3 for backward."""
    L, (_, T, D) = len(model.blocks), model.pos_embed.shape
    return 6 * (12 * L * D * D * T + 2 * L * T * T * D)

def forward_flops(module, *shapes):
    """FLOPs of one forward of `module` on inputs of these shapes, counted by torch on fake tensors: no compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    device, training = next(module.parameters()).device, module.training
    module.eval()  # in train mode a BatchNorm would count this pass in its statistics (REPA-E's discriminator)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
        module(*(torch.zeros(shape, device=device) for shape in shapes))
    module.train(training)
    return counter.get_total_flops()

# -----------------------------------------------------------------------------
# Files: one atomic write, checkpoints, the grids
def atomic_write(path, write):
    """write(file) into a temp file, renamed to `path` once complete: a kill or a failed write (disk full,
    permissions) never leaves a partial `path`. A failed write removes its temp file and says why."""
    path = Path(path)
    tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # two processes writing one file do not share a temp
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)  # a partial file only fills the disk further
        raise UserError(f"could not write {path} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None

def atomic_save(path, state):
    atomic_write(path, lambda f: torch.save(state, f))

def atomic_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))

def latest_checkpoint(out_dir):
    files = sorted((Path(out_dir) / 'checkpoints').glob('*.pt'))  # zero-padded step names; *.pt.<pid>.tmp: unfinished
    return files[-1] if files else None

def load_state(model, state_dict, what='checkpoint'):
    """load_state_dict(strict=True), but a mismatch says which keys and shapes differ instead of a wall of text."""
    if not isinstance(model, nn.Module):  # an optimizer
        return model.load_state_dict(state_dict)
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    shapes = sorted(f"{k}: {tuple(state_dict[k].shape)} in the {what}, {tuple(own[k].shape)} in the model"
                    for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        lines = [f"  {label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for label, keys in
                 ((f"missing from the {what}", missing), ("not in the model", unexpected)) if keys]
        raise UserError('\n'.join([f"the {what} was made for another model config:", *lines,
                                   *('  ' + s for s in shapes[:6])]))
    model.load_state_dict(state_dict)

def weights_fingerprint(model):
    """A float that equal weights reproduce bit for bit and different weights almost surely do not. A model without
    weights (the HOG and SIFT teachers) is its name and configuration: a string, e.g. 'sift: SIFT(grid=16)'."""
    params = list(model.parameters())
    if params:
        return sum(((i + 1) * p.double().sum() + p.double().square().sum()) for i, p in enumerate(params)).item()
    inner = getattr(model, 'model', model)  # a Teacher wraps its descriptor
    settings = dict(vars(type(inner))) | vars(inner)  # HOG's class settings, SIFT's grid
    config = ', '.join(f'{k}={v}' for k, v in sorted(settings.items())
                       if type(v) in (int, float, str, bool) and not k.startswith('_') and k != 'training')
    return f"{getattr(model, 'name', '')}: {type(inner).__name__}({config})"

def to_uint8(x):
    """[-1, 1] floats (B, 3, H, W) -> uint8 (B, H, W, 3), rounding to nearest (REPA truncates; DiT rounds)."""
    return (127.5 * x.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

def save_grid(images, path, cols=None):
    """uint8 (N, H, W, 3) -> one PNG, `cols` images a row (missing cells black); cells smaller than 64 px are enlarged
    (nearest) so people can see them."""
    n, h, w, _ = images.shape
    cols = min(cols or math.ceil(math.sqrt(n)), n)
    rows, k = -(-n // cols), max(1, 64 // h)
    images = torch.cat([images.cpu(), torch.zeros(rows * cols - n, h, w, 3, dtype=torch.uint8)])
    grid = images.view(rows, cols, h, w, 3).transpose(1, 2).reshape(rows * h, cols * w, 3)  # (rows h, cols w, 3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.repeat_interleave(k, 0).repeat_interleave(k, 1).numpy()).save(path)

def shard_generator(seed, k, device='cpu'):
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))

@torch.no_grad()
def draw_shard(s, k, model, vae, norm, device, autocast=contextlib.nullcontext(), net=None):
    """Shard k of s.num_samples images of `model` (in eval mode: the EMA model) as uint8 (n, H, W, 3): images
    k * s.batch_size ..., from seeds of (s.seed, k) alone, so they depend neither on the number of processes nor on
    which one draws the shard. The one place a model turns seeds into images: fid.py sample and Run.evaluate. s: the
    settings (fid.py sample's flags: mode, num_steps, cfg_scale, guidance_low/high, class_balanced); net: the model
    as it runs (compiled)."""
    n, size = min(s.batch_size, s.num_samples - k * s.batch_size), model.x_embedder.input_size
    g = shard_generator(s.seed, k)
    noise = torch.randn(n, model.in_channels, size, size, generator=g)
    y = (torch.arange(k * s.batch_size, k * s.batch_size + n) % model.num_classes if s.class_balanced
         else torch.randint(0, model.num_classes, (n,), generator=g))
    net = model if net is None else net  # (a compiled module has no truth value)
    with autocast:
        if isinstance(model, JiT):  # its own sampler: pixels, from t = 0; it draws no noise of its own
            z = jit_sample(net, noise.to(device), y.to(device), s.mode, s.num_steps, s.cfg_scale, s.guidance_low,
                           s.guidance_high)
        else:
            z = sample(net, noise.to(device), y.to(device), s.mode, s.num_steps, s.cfg_scale, s.guidance_low,
                       s.guidance_high, generator=shard_generator(s.seed, k, device))
    return to_uint8(to_pixels(z.float(), vae, norm)).cpu().numpy()  # (n, H, W, 3)

# -----------------------------------------------------------------------------
# FID while training (--eval-every): the EMA model's images from the same seeds at every evaluation, drawn as fid.py
# sample draws them and scored as fid.py eval scores them (FID; IS from 5000 images on) against --eval-ref
EVAL = dict(eval_every=0, eval_samples=10_000, eval_ref=None, eval_sampler=None, eval_steps=None, eval_cfg=1.0,
            eval_batch=64, inception=None, wandb=None)
RUN |= EVAL  # how a run goes: may change when it resumes
DEFAULTS |= EVAL

def npz_header(path):
    """(N, H, W, C) of arr_0 in an ADM .npz, from its header alone (the images are not read)."""
    with np.load(path) as f, f.zip.open('arr_0.npy') as a:
        v = np.lib.format.read_magic(a)
        return (np.lib.format.read_array_header_1_0 if v == (1, 0) else np.lib.format.read_array_header_2_0)(a)[0]

@torch.no_grad()
def inception_features(net, images, device, batch_size=64):
    """pool3 (N, 2048) and logits (N, 1008) of uint8 images (N, H, W, 3), TF32 off as fid.py eval computes them."""
    before, outs = tf32(False), []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
        outs.append(net(x)[::2])
    tf32(before)
    return [torch.cat(o).cpu().numpy() for o in zip(*outs)]

def reference_stats(path, net, device, batch_size=64):
    """mu and sigma of the reference batch: those it stores (ADM's), else its images' (as fid.py eval)."""
    with np.load(path) as f:
        if 'mu' in f.files:
            return f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
        return compute_stats(inception_features(net, f['arr_0'], device, batch_size)[0], device)

def eval_settings(cfg):
    """The evaluation's sampler settings, named as fid.py sample's flags (draw_shard reads them); the run's seed."""
    mode = cfg.eval_sampler or cfg.preview  # the recipe's: SDE, MeanFlow's one step, JiT's Heun (50 steps)
    steps = cfg.eval_steps or (1 if mode == 'meanflow' else 50 if cfg.objective == 'jit' else 250)
    return argparse.Namespace(num_samples=cfg.eval_samples, batch_size=cfg.eval_batch, seed=cfg.seed, mode=mode,
                              num_steps=steps, cfg_scale=cfg.eval_cfg,
                              guidance_low=0.0, guidance_high=1.0, class_balanced=False)

# -----------------------------------------------------------------------------
# Bad data: an unreadable image is replaced by the next readable one of its class (ImageData), reported once, and
# counted; the run stops when more than --max-bad-fraction of what it drew was unreadable
def readable_image(data, i):
    """Image i of a folder, center-cropped, and the unreadable files [(path, reason)] met on the way: a corrupt file
    is replaced by the next readable one of its class."""
    bad = []
    for j in range(len(data.files)):
        if data.labels[(i + j) % len(data.files)] != data.labels[i]:
            continue
        path = data.root / data.files[(i + j) % len(data.files)]
        try:
            return center_crop(path, data.resolution), bad
        except (OSError, ValueError, SyntaxError) as e:
            bad.append((str(path), f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
    raise UserError(f"no readable image of class {data.labels[i]} under {data.root}")

def collate_reporting(samples):
    """default_collate of (image, moments, label, tokens) samples, and their unreadable files in one list: they
    travel with the batch from a DataLoader worker to the main process, which reports each file once."""
    return (*torch.utils.data.default_collate([s[:4] for s in samples]), [b for s in samples for b in s[4]])

def report_unreadable(seen, bad):
    """Warn about each unreadable file of `bad` not in `seen` (path -> reason) yet, once; add it there."""
    for path, why in bad:
        if path not in seen:
            seen[path] = why
            print(f"warning: unreadable image {path} ({why}); the next readable image of its class replaces it "
                  f"(reported once; the count is in log.jsonl as bad_images)", file=sys.stderr)

def chunks(data, ids, batch_size, num_workers=0, desc=None):
    """(ids, images, moments, labels) of the samples `ids`, batch_size at a time, each unreadable image reported once.
    The loader's generator is its own: the global RNG stays untouched."""
    seen, parts = {}, [ids[i: i + batch_size] for i in range(0, len(ids), batch_size)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=parts, num_workers=num_workers,
                                         generator=torch.Generator(), worker_init_fn=ignore_stop_signals,
                                         collate_fn=collate_reporting)
    for part, (img, moments, y, _, bad) in zip(parts, tqdm(loader, desc=desc, disable=desc is None)):
        report_unreadable(seen, bad)
        yield part, img, moments, y

# -----------------------------------------------------------------------------
# One sharded, resumable pass over the data, for --prepare (VAE latents), the teacher cache and fid.py sample
def sharded_pass(folder, n, work, suffix, save, desc, what):
    """Shard k is done once its mark folder/{k:06d}{suffix} exists; save(work(k), file) writes it, atomically. The
    shards not done are split evenly over the ranks. Before each round and at the end the ranks agree, on the gloo
    group, whether a stop signal reached any of them: waits are on the CPU and last about a shard (an NCCL collective's
    watchdog kills a job after 10 minutes), and one signalled rank stops all: they exit PREEMPTED, rank 0 saying how
    many shards are `what` (e.g. 'shards to do in DIR')."""
    rank, world, _ = dist_info()
    mark = lambda k: folder / f'{k:06d}{suffix}'
    todo = [k for k in range(n) if not mark(k).exists()]  # every rank lists them before the first agreement below
    stop = Stop()

    def stopped():  # a stop signal on any rank, agreed by all: the same answer, at the same round, everywhere
        flag = torch.tensor([float(stop.signal is not None)])
        if world > 1:
            dist.all_reduce(flag, group=cpu_group())
        return flag.item() > 0
    try:
        for i in tqdm(range(rank, -(-len(todo) // world) * world, world), desc, disable=rank != 0):  # equal rounds
            if stopped():
                break
            if i < len(todo):  # the last round may leave a rank without a shard
                value = work(todo[i])
                atomic_write(mark(todo[i]), lambda f: save(value, f))  # a mark exists once its shard is complete
    finally:
        stop.release()  # the handlers back, also when a shard fails
    if stopped():  # also the wait for the other ranks' last shards
        if rank == 0:
            left = sum(not mark(k).exists() for k in range(n))
            print(f"stopped by a signal; {left} of {n} {what}; the same command goes on from there (exit code "
                  f"{PREEMPTED}: requeue)", file=sys.stderr)
        raise SystemExit(PREEMPTED)

def dataset_pass(out, arrays, settings, n_items, work, desc, what):
    """The pass of --prepare and of the teacher cache: memmaps out/<name> of n_items rows (arrays: name -> (shape,
    dtype)) that shard k fills (work(k, memmaps) -> what its mark keeps), in one sharded_pass. settings: what the pass
    is of; unfinished shards of other settings are refused. what: the shards' name when it stops. Returns the marks'
    values in shard order on rank 0 (None elsewhere), which then writes meta.json (it marks completion) and removes
    out/shards."""
    shards, n = out / 'shards', -(-n_items // PREPARE_SHARD)
    if (shards / 'settings.json').exists() and json.loads((shards / 'settings.json').read_text()) != settings:
        raise UserError(f"{shards} holds the unfinished pass of other settings (another teacher, weights, VAE, "
                        f"resolution or dataset); delete it or pick another folder")
    barrier()  # every rank has checked before rank 0 writes
    if dist_info()[0] == 0 and not shards.exists():  # a new pass (else: go on with the shards not done)
        for name, (shape, dtype) in arrays.items():
            np.lib.format.open_memmap(out / name, mode='w+', dtype=dtype, shape=shape).flush()  # sparse until written
        shards.mkdir(parents=True)
        atomic_text(shards / 'settings.json', json.dumps(settings))  # last: the files exist once it does
    barrier()
    memmaps = {name: np.load(out / name, mmap_mode='r+') for name in arrays}
    sharded_pass(shards, n, lambda k: work(k, memmaps), '.pt', torch.save, desc, what)
    return [torch.load(shards / f'{k:06d}.pt', weights_only=True) for k in range(n)] if dist_info()[0] == 0 else None

def shard_rows(k, n):
    return range(k * PREPARE_SHARD, min(n, (k + 1) * PREPARE_SHARD))

def moment_sums(mean, std):
    """Posterior (B, C, h, w) mean and std -> (3, C) float64 sums of mu, mu^2 + sigma^2 and the count."""
    mean, std = mean.double(), std.double()
    return torch.stack([mean.sum((0, 2, 3)), (mean ** 2 + std ** 2).sum((0, 2, 3)),
                        torch.full_like(mean[0, :, 0, 0], mean[:, 0].numel())])

def latent_stats(sums):
    """Per-channel mean and std of posterior samples z = mu + sigma eps from their moment sums: E[z] = E[mu],
    Var z = E[mu^2 + sigma^2] - E[mu]^2."""
    mean = sums[0] / sums[2]
    return mean, (sums[1] / sums[2] - mean ** 2).sqrt()

def latent_moments(data, vae, ids, device, batch_size=64, num_workers=0, desc=None):
    """(ids, posterior mean, std) of the images `ids`, a batch at a time: (B, C, h, w) each."""
    for part, img, _, _ in chunks(data, ids, batch_size, num_workers, desc):
        yield part, *vae.encode(img.to(device).float() / 127.5 - 1)

@torch.no_grad()
def prepare_latents(data_path, out_dir, resolution, vae_spec, device, num_classes=10, seed=0, synthetic_size=10_000,
                    batch_size=64, num_workers=0):
    """--prepare: VAE posterior mean/std of every image as an fp16 memmap, the labels, and the per-channel latent
    statistics (latent_stats), in one dataset_pass; a stop signal ends it between shards (exit PREEMPTED) and the
    same command goes on from there. meta.json is written last and marks completion."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = ImageData(data_path, resolution, num_classes, seed, synthetic_size)
    vae = encoders.load_vae(vae_spec, device=device)
    C, h = vae.latent_channels, resolution // vae.downsample
    source = str(Path(data_path).resolve()) if data_path else 'synthetic'
    settings = dict(source=source, resolution=resolution, vae=vae_spec, size=len(data), shape=[2 * C, h, h],
                    shard=PREPARE_SHARD)

    def work(k, memmaps):  # shard k's posterior moments into the memmap; their sums are its mark
        part = torch.zeros(3, C, dtype=torch.float64, device=device)
        for ids, mean, std in latent_moments(data, vae, list(shard_rows(k, len(data))), device, batch_size,
                                             num_workers):
            memmaps['latents.npy'][ids] = torch.cat([mean, std], 1).half().cpu().numpy()
            part += moment_sums(mean, std)
        memmaps['latents.npy'].flush()
        return part.cpu()
    sums = dataset_pass(out, {'latents.npy': ((len(data), 2 * C, h, h), np.float16)}, settings, len(data), work,
                        'prepare latents', f"shards to do in {out / 'shards'}")
    if dist_info()[0] == 0:  # the shards' sums in shard order: the same statistics whatever the ranks and restarts
        mu, sd = latent_stats(sum(sums))
        np.save(out / 'labels.npy', data.labels.astype(np.int64))
        atomic_text(out / 'meta.json', json.dumps(dict(
            source=source, resolution=resolution, num_classes=data.num_classes, seed=seed, size=len(data),
            vae=vae_spec, shape=[2 * C, h, h], stats=dict(mean=mu.tolist(), std=sd.tolist())), indent=1))
        shutil.rmtree(out / 'shards')
        print(f"prepared {len(data)} latents {(2 * C, h, h)} in {out}; per-channel mean {np.round(mu.tolist(), 4)}, "
              f"std {np.round(sd.tolist(), 4)}")
    barrier()

# The teacher-token cache (--teacher-cache DIR, and the study's metrics): the frozen teachers run once over the images
# and their tokens (before the spatial norm, in the dtype training computes them in) go into one memmap per teacher;
# training then reads them by image index. iREPA uses no data augmentation (a centre crop, always the same), so an
# image's tokens never change and the cache is exact: on a CPU the cached run is the online run, bit for bit. A data
# augmentation added to this file must refuse the cache. For the paper's big teachers this is most of the compute:
# WebSSL-1B's forward (~600 GFLOP per image) or PE-Core-G's (~970) against ~710 for a whole SiT-XL/2 step.
CACHE_DTYPES = {torch.float32: 'float32', torch.float16: 'float16', torch.bfloat16: 'int16'}  # bf16: its raw bits

def dataset_fingerprint(data, ids=None):
    """A hash of what the teacher sees of a dataset (or of its images `ids`): the files and labels (names only:
    stat()ing 1.28M files on a network filesystem takes minutes), or the synthetic set's seed, size and classes."""
    what = ['synthetic', data.seed, len(data), data.num_classes] if data.files is None else \
        [str(data.root), data.files, data.labels.tolist()]
    return hashlib.sha256(json.dumps(what + ([] if ids is None else [list(ids)])).encode()).hexdigest()[:16]

def cache_meta(cfg, data, teachers, dtypes, ids=None):
    """What a cache must match to be used: per teacher its name, weights (fingerprint) and token dtype; the image
    resolution, token grid, preprocessing and dataset (or the images `ids` of it)."""
    return dict(teachers=[dict(name=t.name, weights=weights_fingerprint(t), dim=t.dim, dtype=str(d).split('.')[-1])
                          for t, d in zip(teachers, dtypes)],
                resolution=cfg.resolution, grid=teachers[0].grid, siglip_norm=cfg.siglip_norm,
                dataset=dataset_fingerprint(data, ids), size=len(data) if ids is None else len(ids))

def open_cache(path, meta):
    """The cache's token memmaps (N, T, D), one per teacher, read-only; refused unless complete and matching."""
    done = path / 'meta.json'
    if not done.exists():
        raise UserError(f"--teacher-cache {path} is incomplete (no meta.json: its pass was stopped); the same command "
                        f"goes on with it")
    flat = lambda m: {f'teacher {i} {k}': v for i, t in enumerate(m['teachers']) for k, v in t.items()} | \
        {k: v for k, v in m.items() if k not in ('teachers', 'batch')}
    have, want = flat(json.loads(done.read_text())), flat(meta)
    if diff := [f"{k} {have.get(k)} (cache) vs {v} (now)" for k, v in want.items() if have.get(k) != v]:
        raise UserError(f"--teacher-cache {path} holds the tokens of another teacher, weights, resolution or dataset: "
                        f"{'; '.join(diff)}; pick another folder or delete it")
    return [np.load(path / f'tokens-{k}.npy', mmap_mode='r') for k in range(len(meta['teachers']))]

def cache_tokens(teachers, img, precision):
    """What the cache stores of uint8 images: each teacher's raw tokens (B, T, D), in bf16 under --precision bf16
    whatever the teacher returns (CUDA autocast computes LayerNorm in fp32: DINOv2's tokens come out fp32, twice the
    disk), else as returned. The online path keeps the teacher's own dtype, as the official code does."""
    with torch.autocast(img.device.type, torch.bfloat16) if precision == 'bf16' else contextlib.nullcontext():
        tokens = [teacher(img.float() / 255) for teacher in teachers]
    return [t.to(torch.bfloat16) for t in tokens] if precision == 'bf16' else tokens

@torch.no_grad()
def teacher_cache(path, cfg, data, teachers, batch_size, device, ids=None):
    """The cache of `teachers` on the images `ids` of `data` (default all), built when absent or unfinished (in one
    dataset_pass, in batches of the training's shape: the teacher computes as it does in training), then opened:
    (memmaps, token dtypes). The free disk space is checked on every rank before anything is written. cfg: the
    run's precision, num_workers, resolution and siglip_norm."""
    ids, R = list(range(len(data))) if ids is None else list(ids), cfg.resolution
    probe = torch.zeros(batch_size, 3, R, R, dtype=torch.uint8, device=device)
    dtypes = [t.dtype for t in cache_tokens(teachers, probe, cfg.precision)]  # bf16 or what the teacher returns
    meta, T = cache_meta(cfg, data, teachers, dtypes, None if len(ids) == len(data) else ids), teachers[0].grid ** 2
    arrays = {f'tokens-{k}.npy': ((len(ids), T, t.dim), CACHE_DTYPES[d])
              for k, (t, d) in enumerate(zip(teachers, dtypes))}
    if not (path / 'meta.json').exists():
        need = sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in arrays.values())
        sizes = ' + '.join(' x '.join(map(str, (*shape, f'{np.dtype(dt).itemsize} B')))
                           for shape, dt in arrays.values())
        path.mkdir(parents=True, exist_ok=True)
        if not (path / 'shards').exists() and (free := shutil.disk_usage(path).free) < need * 1.02:  # + headers
            raise UserError(f"--teacher-cache {path}: the tokens need {need / 1e9:.1f} GB ({sizes}), the disk has "
                            f"{free / 1e9:.1f} GB free; pick another folder or free space")

        def work(k, memmaps):  # shard k's images through the teachers, their tokens into the memmaps
            row = k * PREPARE_SHARD
            for part, img, _, _ in chunks(data, ids[row: row + PREPARE_SHARD], batch_size, cfg.num_workers):
                img = torch.cat([img, img[-1:].expand(batch_size - len(img), -1, -1, -1)])  # the training's shape
                for mm, t in zip(memmaps.values(), cache_tokens(teachers, img.to(device), cfg.precision)):
                    mm[row: row + len(part)] = t[:len(part)].cpu().view(getattr(torch, mm.dtype.name)).numpy()
                row += len(part)
            for mm in memmaps.values():
                mm.flush()  # before the mark: a marked shard is on disk
        if dist_info()[0] == 0 and not (path / 'shards').exists():
            print(f"teacher cache: {len(ids)} images x {T} tokens of {', '.join(t.name for t in teachers)} "
                  f"into {path}")
        dataset_pass(path, arrays, meta, len(ids), work, 'teacher cache',
                     f'shards of the teacher cache to do in {path}')
        if dist_info()[0] == 0:
            atomic_text(path / 'meta.json', json.dumps(meta | dict(batch=batch_size), indent=1))
            shutil.rmtree(path / 'shards')
        barrier()
    return open_cache(path, meta), dtypes

# -----------------------------------------------------------------------------
# Stop signals, the time limit, one run per folder
class Stop:
    """SIGTERM (what SLURM and Kubernetes send before a kill) and SIGINT only set .signal until release(): the loop
    checkpoints and exits PREEMPTED after its step; a sharded pass stops between shards."""
    def __init__(self):
        self.signal = None
        self.old = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(self, signum, frame):
        self.signal = signum

    def release(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

def ignore_stop_signals(worker_id):
    """A DataLoader worker's init: schedulers signal every process of a job; the main process stops its workers."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

class StartupStop(BaseException):
    """A stop signal before the loop began: nothing to checkpoint, the start-up ends at once. A BaseException: a
    library's `except Exception` (a hub download's retries) does not swallow it."""

def catch_startup_signals():
    def handler(signum, frame):
        raise StartupStop(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)

def seconds(text):
    """A duration: '3h55m', '90m', '1h30m20s', '45s' or plain seconds ('600') -> seconds."""
    m = re.fullmatch(r'(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?', text.strip())
    if not m or not any(m.groups()):
        raise ValueError(f"not a duration: {text!r}; write it as 3h55m, 90m, 45s or seconds")
    return sum(float(v or 0) * k for v, k in zip(m.groups(), (3600, 60, 1)))

def lock_run(out):
    """One run per folder: rank 0 holds an exclusive flock on <out>/lock for the whole run; the OS releases it when
    the process dies, even by kill -9. A second run stops with one line naming the holder. Removes the PREEMPTED
    marker of the run it continues."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / 'lock', 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise UserError(f"{out} is in use by {holder} (it holds {out / 'lock'}); one run per --out-dir: wait for it "
                        f"to end, or start this one in another --out-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    (out / 'PREEMPTED').unlink(missing_ok=True)
    return f

# -----------------------------------------------------------------------------
# The run folder: a fresh run, or the checkpoint --resume continues
def fresh_out_dir(out, overwrite, master):
    """A fresh run does not mix with another: refused where out/ holds checkpoints, unless --overwrite, which moves
    that run's files into out/replaced-<UTC time>/. Nothing is deleted; prepared latents (out/latents) stay."""
    old = latest_checkpoint(out)
    if old and not overwrite:
        raise UserError(f"{out} already holds the checkpoints of a run (the newest: {old}); continue it with --resume, "
                        f"or start this one in another --out-dir (--overwrite moves the old run aside)")
    moved = [p for p in (out / n for n in ('checkpoints', 'log.jsonl', 'config.json', 'samples')) if p.exists()]
    if master and overwrite and moved:
        aside = out / time.strftime('replaced-%Y%m%d-%H%M%S', time.gmtime())
        aside.mkdir()
        for p in moved:
            os.replace(p, aside / p.name)
        print(f"--overwrite: moved the earlier run's {', '.join(p.name for p in moved)} into {aside}", file=sys.stderr)
    elif master and (out / 'log.jsonl').exists():
        print(f"note: {out} holds the log of an earlier run without checkpoints; this run starts a new log.jsonl",
              file=sys.stderr)

def newest_loadable(out, master):
    """The newest checkpoint that loads (or None), and those that did not, which rank 0 renames *.corrupt."""
    bad = []
    for path in sorted((out / 'checkpoints').glob('*.pt'), reverse=True):
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
            if isinstance(ckpt, dict) and {'step', 'config', 'model'} <= ckpt.keys():
                return ckpt, path, bad
            why = 'not a checkpoint of irepa.py'
        except Exception as e:  # whatever torch.load raises on a broken file
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        bad.append(path.with_name(path.name + '.corrupt'))
        if master:
            os.replace(path, bad[-1])
            print(f"*** WARNING: --resume: {path} does not load ({why}); renamed it {bad[-1].name}, trying the one "
                  f"before it ***", file=sys.stderr)
    return None, None, bad

def resume_checkpoint(cfg, out, master):
    """The newest checkpoint that loads, refused if made with other METHOD settings (RUN ones may change); None when
    there is none yet (a job stopped in its start-up). A finished run says where its results are and exits 0."""
    ckpt, path, bad = newest_loadable(out, master)
    if ckpt is None and (bad := bad or sorted((out / 'checkpoints').glob('*.corrupt'))):
        raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'} loads ({', '.join(p.name for p in bad)} "
                        f"set aside); start afresh with --overwrite, or in another --out-dir")
    if ckpt is None:
        if master:
            print(f"--resume: no checkpoint in {out / 'checkpoints'} yet: starting afresh", file=sys.stderr)
        return None
    may_change = RUN.keys() | {'trained_teachers'}  # trained_teachers: checked on its own (Run.load_teachers)
    if diff := {k: (ckpt['config'].get(k), v) for k, v in vars(cfg).items()
                if k not in may_change and ckpt['config'].get(k) != v}:
        raise UserError(f"--resume: {path} was made with another config; differing settings (checkpoint, now): {diff}")
    if ckpt['step'] >= cfg.max_steps:
        if master:
            grids = out / 'samples'
            print(f"--resume: the run in {out} has finished (step {ckpt['step']} of --max-steps {cfg.max_steps}): "
                  f"final checkpoint {path}{f', samples in {grids}' if grids.is_dir() else ''}", file=sys.stderr)
        raise SystemExit(0)
    if master:
        print(f"resuming from {path} (step {ckpt['step']})" + (' *** NOT the newest: see the warning above ***'
                                                                if bad else ''))
    return ckpt

def training_data(cfg, device, master, latents=True):
    """The dataset and the normalization of the SiT's inputs (None in pixel space and for a unit that trains on
    images: latents=False, REPA-E, whose BatchNorm normalizes); latents are prepared into <out-dir>/latents."""
    data = ImageData(cfg.data_path, cfg.resolution, cfg.num_classes, cfg.seed, cfg.synthetic_size)
    if not latents:
        if cfg.vae == 'none' or data.latents is not None:
            raise UserError(f"--recipe {cfg.recipe} trains the VAE end to end, so it needs images and a VAE to start "
                            "from: an image folder (or none: the synthetic set) and --vae, not prepared latents or "
                            "--vae none")
        return data, None
    if cfg.vae != 'none' and data.latents is None:
        prepared = Path(cfg.out_dir) / 'latents'
        if not (prepared / 'meta.json').exists():
            if master:
                print(f"no prepared latents: encoding the data once with {cfg.vae} into {prepared}")
            prepare_latents(cfg.data_path, prepared, cfg.resolution, cfg.vae, device, cfg.num_classes, cfg.seed,
                            cfg.synthetic_size, num_workers=cfg.num_workers)
        data = ImageData(prepared, cfg.resolution)
    if data.latents is None:
        return data, None
    stats, C = data.meta['stats'], data.latents.shape[1] // 2  # iREPA: the data's per-channel statistics
    mean, std = ([0.0] * C, [1 / cfg.latent_scale] * C) if cfg.latent_scale else (stats['mean'], stats['std'])  # REPA
    return data, LatentNorm(data.meta['vae'], mean, std, device=device)

# -----------------------------------------------------------------------------
# The data order: exact resume on any number of ranks
def batches(n, global_batch, rank, world, seed, start=0):
    """This rank's share of each global batch, from step `start` on, forever. Epoch e is a permutation seeded with
    seed + e and drops its last partial batch, so the data position is just the step number: resuming at step k
    reproduces the same batches on any number of workers."""
    if n < global_batch:
        raise UserError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
    def shares(step, local=global_batch // world):
        while True:
            epoch, k = divmod(step, n // global_batch)
            if k == 0 or step == start:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            yield perm[k * global_batch + rank * local: k * global_batch + (rank + 1) * local].tolist()
            step += 1
    return shares(start)

# -----------------------------------------------------------------------------
# The seam: everything around the loop of `train`, and the trainer units' view of it
class Run:
    """Run(cfg): processes and device, the run folder, the data and the checkpoint --resume continues. For the unit:
    load_teachers(grid), wrap(module), and shape, data, norm, autocast, fresh. For the loop: start(unit) restores
    the checkpoint and starts the loader, the log and the stop signals; batch(); end_step(step, stats) keeps the
    sums on the device and, at intervals, logs, checkpoints and draws grids; it says when every rank stops."""
    def __init__(self, cfg):
        (self.rank, self.world, _), self.cfg, self.started = dist_info(), cfg, time.time()
        self.master, self.device, self.out = self.rank == 0, torch.device(cfg.device), Path(cfg.out_dir)
        if cfg.global_batch_size % self.world:
            raise UserError(f"--global-batch-size {cfg.global_batch_size} is not divisible by the {self.world} "
                            f"processes")
        use_device(self.device)  # the only device-specific settings; precision and compilation follow the flags
        self.ckpt = resume_checkpoint(cfg, self.out, self.master) if cfg.resume else None
        self.fresh = self.ckpt is None
        if self.fresh:
            fresh_out_dir(self.out, cfg.overwrite, self.master)
        self.data, self.norm = training_data(cfg, self.device, self.master, OBJECTIVES[cfg.objective].latents)
        latents = self.data.latents is not None
        self.shape = (self.data.latents.shape[1] // 2, self.data.latents.shape[2]) if latents else (3, cfg.resolution)
        self.autocast = torch.autocast(self.device.type, torch.bfloat16) if cfg.precision == 'bf16' else \
            contextlib.nullcontext()
        self.teachers, self.cache_dtypes = [], []
        torch.manual_seed(cfg.seed)  # the same on every rank: random teachers and networks agree

    def load_teachers(self, grid):
        """The frozen teachers (bf16 weights with --precision bf16; --demo: HOG if needed), in the config as
        trained_teachers (a resumed run must train with the same ones); --teacher-cache DIR: the cache, built when
        absent, and the data serves its tokens. Images are then read only where the SiT trains on them (pixel
        space, REPA-E's VAE), and the teachers leave the GPU."""
        cfg = self.cfg
        self.teachers = encoders.load_teachers(
            cfg.encoder, cfg.encoder_weights, cfg.demo, grid=grid, device=self.device, compile=cfg.compile,
            dtype=torch.bfloat16 if cfg.precision == 'bf16' else None, siglip_norm=cfg.siglip_norm)
        cfg.trained_teachers = ','.join(t.name for t in self.teachers) or 'none'  # --demo may fall back to another
        before = self.ckpt and self.ckpt['config'].get('trained_teachers')
        if before and before != cfg.trained_teachers:
            raise UserError(f"--resume: the checkpoint's run trained with the teacher(s) {before}, this one would "
                            f"train with {cfg.trained_teachers}; give it the same teacher weights (--encoder-weights)")
        if cfg.teacher_cache and self.teachers:
            tokens, self.cache_dtypes = teacher_cache(Path(cfg.teacher_cache), cfg, self.data, self.teachers,
                                                      cfg.global_batch_size // self.world, self.device)
            self.data = self.data.serving(tokens, images=self.data.latents is None)
            for t in self.teachers:
                t.to('cpu')
            if self.master:
                print(f"teacher tokens from the cache {cfg.teacher_cache} ({len(self.data)} images)")
        return self.teachers

    def wrap(self, module, compile=True):
        """The module as the step calls it: DDP under torchrun (its gradients are views of the buckets: no copy),
        then torch.compile with --compile."""
        if self.world > 1:
            module = DDP(module, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                         gradient_as_bucket_view=True)
        return torch.compile(module) if compile and self.cfg.compile else module

    def start(self, unit):
        """Everything of `unit` in unit.saved and every rank's random state as the checkpoint holds them (--resume),
        then the loader from that step on, the stop signals, the log; returns the first step."""
        cfg, self.unit = self.cfg, unit
        torch.manual_seed(cfg.seed * self.world + self.rank)  # per rank a stream of t, noise and label dropout
        step = self.restore(self.ckpt) if self.ckpt else 0
        self.loader = iter(torch.utils.data.DataLoader(
            self.data, batch_sampler=batches(len(self.data), cfg.global_batch_size, self.rank, self.world, cfg.seed,
                                             step),
            num_workers=cfg.num_workers, pin_memory=self.device.type == 'cuda', persistent_workers=cfg.num_workers > 0,
            generator=torch.Generator(),  # its own generator: leaves the training RNG alone
            collate_fn=collate_reporting, worker_init_fn=ignore_stop_signals))
        self.cpu_group = cpu_group() if self.world > 1 else None  # should_stop's flags, off the GPU
        self.stop, self.stop_work, self.stopped = Stop(), None, False
        self.deadline = time.time() + seconds(cfg.time_limit) if cfg.time_limit else None
        self.flops = unit.flops() + sum(t.flops() for t in self.teachers if not self.data.tokens)  # per image: MFU
        self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(self.device)),
                         None) if self.device.type == 'cuda' else None
        self.sums, self.n_steps, self.first_bad = {}, 0, torch.tensor(-1, device=self.device)
        self.drawn, self.bad_draws, self.bad_files, self.grad_prev, self.grad_low = 0, 0, {}, {}, {}
        self.rec, self.wall0, self.shown, self.wandb = None, 0.0, {}, None
        if cfg.eval_every:
            self.eval_start()
        if self.master:  # the run folder, and one line that says what trains on what
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_text(self.out / 'config.json', json.dumps(vars(cfg), indent=1))
            self.log = self.open_log(step)
            if cfg.wandb:
                import wandb  # only when asked, as nanoGPT (validate checked that it is installed)
                self.wandb = wandb
                wandb.init(project=cfg.wandb, config=vars(cfg), dir=str(self.out))
            m, T = unit.model, unit.model.pos_embed.shape[1]
            what = 'pixels' if m.in_channels == 3 else f'latents {(m.in_channels, *[m.x_embedder.input_size] * 2)}'
            print(f"{cfg.model} ({cfg.recipe}): {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters "
                  f"(projectors included), {T} tokens, {what}, {len(self.data)} images, {self.data.num_classes} "
                  f"classes, teachers: {', '.join(t.name for t in self.teachers) or 'none'}")
        self.bar = tqdm(total=cfg.max_steps, initial=step, disable=not self.master, desc='train', dynamic_ncols=True)
        self.t0 = time.time()  # the first interval's img/s counts the steps, not the start-up
        return step

    def eval_start(self):
        """--eval-every: the Inception (--demo: random where its file is missing, said loudly), the reference's
        statistics on rank 0 (--demo without --eval-ref: a reference of its own, its data's first images)."""
        cfg = self.cfg
        if cfg.demo and not cfg.eval_ref:
            cfg.eval_ref = str(self.out / 'eval_ref.npz')
            if self.master:
                images = np.stack([self.data.image(i)[0] for i in range(cfg.eval_samples)])  # (N, R, R, 3)
                atomic_write(cfg.eval_ref, lambda f: np.savez(f, arr_0=images))
        try:
            weights = 'random' if cfg.inception == 'random' else encoders.find_inception(cfg.inception)
        except encoders.LoadError:
            if not cfg.demo:
                raise
            weights = 'random'
        self.inception = encoders.load_inception(weights, device=self.device)
        self.ref_stats = self.master and reference_stats(cfg.eval_ref, self.inception, self.device, cfg.eval_batch)
        self.eval_as = eval_settings(cfg)

    @torch.no_grad()
    def evaluate(self):
        """FID (IS from 5000 images on) of the EMA model, its images drawn in shards over the ranks (draw_shard),
        their features gathered on rank 0. The RNG state is put back and the EMA model only read: the training
        goes on as without it. Returns the record's entries (FID on rank 0) and the time it took."""
        t0, s, unit, feats = time.time(), self.eval_as, self.unit, {}
        norm = unit.latent_norm()
        if norm is not None and unit.vae is None:  # prepared latents: the VAE decodes the images only
            unit.vae = encoders.load_vae(norm.vae, device=self.device)
        with torch.random.fork_rng([self.device] if self.device.type == 'cuda' else []):
            for k in range(self.rank, -(-s.num_samples // s.batch_size), self.world):
                images = draw_shard(s, k, unit.ema, unit.vae, norm, self.device, self.autocast)
                feats[k] = inception_features(self.inception, images, self.device, s.batch_size)
        if self.world > 1:
            parts = [None] * self.world if self.master else None
            dist.gather_object(feats, parts, group=self.cpu_group)
            feats = {k: v for p in parts or [] for k, v in p.items()}
        rec = {}
        if self.master:
            pool, logits = (np.concatenate([feats[k][i] for k in sorted(feats)]) for i in (0, 1))
            rec['fid'] = frechet_distance(*compute_stats(pool, self.device), *self.ref_stats)  # samples first (ADM)
            rec |= dict(inception_score=inception_score(logits)) if len(logits) >= 5000 else {}
        return rec | dict(eval_s=time.time() - t0)

    def restore(self, ckpt):
        for name, obj in self.unit.saved.items():
            load_state(obj, ckpt[name], f'checkpoint ({name})')
        if len(ckpt['rng']) != self.world:
            print(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, now {self.world}: new random "
                  f"streams, the trajectory will differ from an uninterrupted run", file=sys.stderr)
        else:
            torch.set_rng_state(ckpt['rng'][self.rank]['cpu'])
            if self.device.type == 'cuda' and 'cuda' in ckpt['rng'][self.rank]:
                torch.cuda.set_rng_state(ckpt['rng'][self.rank]['cuda'])
        self.ckpt = dict(config=ckpt['config'])  # the weights are the unit's now
        return ckpt['step']

    def open_log(self, step):
        """log.jsonl: a fresh run starts it; a resumed run continues its own, from its checkpoint's step on (lines
        past that step are of steps the interrupted run lost, and they are done again)."""
        path = self.out / 'log.jsonl'
        if step > 0 and path.exists():
            keep = [line for line in open(path) if line.strip() and json.loads(line)['step'] <= step]
            atomic_text(path, ''.join(keep))
            self.wall0 = json.loads(keep[-1]).get('wall_s', 0.0) if keep else 0.0  # the run's time before this process
        return open(path, 'a' if step > 0 else 'w')

    def batch(self):
        """The next batch on the device, without one device-to-host read (Python runs ahead of the GPU): uint8
        images, VAE moments, labels, cached tokens; the unreadable images the loader met are reported and counted."""
        img, moments, y, tokens, bad = next(self.loader)  # see ImageData; bad: [(path, reason)] (collate_reporting)
        self.drawn, self.bad_draws = self.drawn + len(y), self.bad_draws + len(bad)
        report_unreadable(self.bad_files, bad)
        img, moments, y = (v.to(self.device, non_blocking=True) for v in (img, moments, y))
        img = self.unit.transform(img)
        tokens = [t.to(self.device, non_blocking=True).view(d) for t, d in zip(tokens, self.cache_dtypes)]
        return img, moments, y, tokens

    def end_step(self, step, stats):
        """After step `step` (1-based): the sums for the log and the NaN guard, on the device; at intervals the log
        line (the one host sync), a checkpoint, a grid. Whether every rank stops now: a stop signal or the time
        limit, agreed by all (then a checkpoint was just written)."""
        cfg = self.cfg
        self.sums = {k: self.sums.get(k, 0) + v.float() for k, v in stats.items()}
        self.n_steps += 1
        loss = sum(stats.values())  # every loss and gradient norm: a NaN in any of them stops the run (log_interval)
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)
        self.bar.update(1)
        stop = self.should_stop()
        ckpt = step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop
        grid = cfg.sample_every > 0 and (step % cfg.sample_every == 0 or step == cfg.max_steps)
        evald = self.evaluate() if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps) else {}
        if step % cfg.log_every == 0 or ckpt or grid or evald:
            self.log_interval(step, evald)
        if ckpt:
            self.save(step)
        if grid and self.master:
            self.grid(self.out / 'samples' / f'{step:07d}.png')
        return stop

    def should_stop(self):
        """Whether every rank stops after this step: a stop signal arrived or --time-limit is up, on any rank. Under
        DDP the flags travel in a CPU (gloo) all_reduce started one step earlier, so no rank waits on the device or
        stops alone (none is left waiting in a collective); one process reads its own flag."""
        local = self.stop.signal is not None or (self.deadline is not None and time.time() > self.deadline)
        if self.world == 1:
            self.stopped = local
            return local
        if self.stop_work is not None:
            self.stop_work.wait()  # started a step ago: long finished, unless a rank is that far behind
            self.stopped = self.stop_flag.item() > 0
        self.stop_flag = torch.tensor([float(local)])
        self.stop_work = dist.all_reduce(self.stop_flag, group=self.cpu_group, async_op=True)
        return self.stopped

    def log_interval(self, step, evald={}):
        """The one host sync of training, every log_every steps and before checkpoints and grids: the interval's
        means (over the ranks too), the NaN guard, the unreadable images, the gradient watch, speed, memory and MFU;
        rank 0 appends them to log.jsonl."""
        cfg, counts = self.cfg, torch.tensor([self.bad_draws, self.drawn], dtype=torch.float32, device=self.device)
        names, vec = list(self.sums), torch.stack([*self.sums.values(), *counts, self.first_bad.float()])
        if self.world > 1:
            dist.all_reduce(vec[:-1])
            dist.all_reduce(vec[-1:], op=dist.ReduceOp.MAX)
        *vec, bad, drawn, first_bad = vec.tolist()
        if first_bad >= 0:  # every loss and every trained network's gradient norm (REPA-E: the VAE, the discriminator)
            raise FloatingPointError(f"non-finite {', '.join(k for k, v in zip(names, vec) if not math.isfinite(v))} "
                                     f"at step {int(first_bad)}; stopping. The last good checkpoint is "
                                     f"{latest_checkpoint(self.out) or 'none'}; --resume from it (with --qk-norm or a "
                                     f"lower --lr?)")
        if bad > cfg.max_bad_fraction * drawn:  # not a silently different dataset
            files = '; '.join(f'{p} ({why})' for p, why in list(self.bad_files.items())[:20])
            raise UserError(f"{int(bad)} of the {int(drawn)} images drawn so far were unreadable, more than "
                            f"--max-bad-fraction {cfg.max_bad_fraction:g}; stopping. This process met: {files}")
        dt, self.t0 = time.time() - self.t0 - evald.get('eval_s', 0), time.time()  # img/s: the training's alone
        n, cuda = self.n_steps, self.device.type == 'cuda'
        rec = dict(step=step, **{k: v / (n * self.world) for k, v in zip(names, vec)},
                   img_per_s=n * cfg.global_batch_size / dt, steps_per_s=n / dt, interval_s=dt,
                   wall_s=self.wall0 + time.time() - self.started,  # the run's, start-ups and earlier processes too
                   peak_mem_gb=(torch.cuda.max_memory_allocated(self.device) if cuda else
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30)
        rec['mfu'] = rec['img_per_s'] / self.world * self.flops / self.peak if self.peak else None  # unknown on CPUs
        rec['bad_images'] = int(bad)  # unreadable images drawn so far, all ranks
        rec |= dict(images=step * cfg.global_batch_size, gpu_hours=rec['wall_s'] * self.world / 3600) | evald
        if warnings := self.grad_watch(rec):
            rec['grad_watch'] = warnings
        self.sums, self.n_steps, self.rec = {}, 0, rec
        if self.master:
            print(json.dumps(rec), file=self.log, flush=True)
            self.shown |= {k: f"{rec[k]:.4g}" for k in ('fid', 'eval_s') if k in rec}  # the last evaluation's
            self.bar.set_postfix(**{k: f"{rec[k]:.4f}" for k in ('flow', 'mse', 'align') if k in rec},
                                 img_s=f"{rec['img_per_s']:.1f}", **self.shown)
            plot_curves([self.out], self.out / 'curves.png')  # ~50 ms (2-core CPU, a 12-line log)
            if self.wandb:
                self.wandb.log(json.loads(json.dumps(rec)), step=step)  # the log's record, as it reads it back

    def grad_watch(self, rec):
        """The failures a finite loss hides (REPA-E's collapse, REPA-E#30): for each trained network, its mean
        gradient norm below --grad-floor for GRAD_FLOOR_INTERVALS log intervals in a row, or more than --grad-jump
        times larger or smaller than in the interval before. Returns this interval's warnings (the log keeps them);
        rank 0 prints each low stretch once and every jump."""
        out, cfg = [], self.cfg
        for k in [k for k in rec if k.startswith('grad_norm')]:
            g, prev = rec[k], self.grad_prev.get(k)
            self.grad_low[k] = self.grad_low.get(k, 0) + 1 if g < cfg.grad_floor else 0
            if self.grad_low[k] >= GRAD_FLOOR_INTERVALS:
                out.append(f"{k} {g:.3g} below --grad-floor {cfg.grad_floor:g} for {self.grad_low[k]} log intervals: "
                           f"is it still learning?")
            if prev and g and max(g / prev, prev / g) > cfg.grad_jump:
                out.append(f"{k} jumped from {prev:.3g} to {g:.3g} (more than --grad-jump {cfg.grad_jump:g} times)")
            self.grad_prev[k] = g
        for w in out:
            if self.master and ('jumped' in w or f'for {GRAD_FLOOR_INTERVALS} log' in w):
                print(f"warning: step {rec['step']}: {w}", file=sys.stderr)
        return out

    def save(self, step):
        """Checkpoint `step` atomically on rank 0: everything in unit.saved, the step, the config, every rank's RNG
        state and the latent normalization fid.py decodes with. Under DDP the ranks' weights are compared first."""
        unit, cuda = self.unit, self.device.type == 'cuda'
        rng = dict(cpu=torch.get_rng_state()) | (dict(cuda=torch.cuda.get_rng_state(self.device)) if cuda else {})
        rngs, prints = [rng], [weights_fingerprint(unit.model)]
        if self.world > 1:  # DDP keeps replicas equal; check it before saving rank 0's copy as everyone's
            rngs, prints = [None] * self.world, [None] * self.world
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(prints, weights_fingerprint(unit.model))
            if len(set(prints)) > 1:
                raise RuntimeError(f"step {step}: the {self.world} ranks hold different weights {prints}")
        error, latent = None, unit.latent_norm()
        if self.master:
            try:
                atomic_save(self.out / 'checkpoints' / f'{step:07d}.pt',
                            {k: v.state_dict() for k, v in unit.saved.items()} | dict(
                                step=step, config=vars(self.cfg), model_args=unit.model_args, rng=rngs,
                                latent=latent and latent.to_dict()))
            except UserError as e:
                error = f"{e}; stopping. The previous checkpoint, {latest_checkpoint(self.out) or 'none'}, is " \
                        f"intact: free space or fix the permissions, then --resume"
        if self.world > 1:  # every rank stops when rank 0 could not write
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise UserError(error)
        for old in sorted((self.out / 'checkpoints').glob('*.pt'))[:-self.cfg.keep_last] \
                if self.master and self.cfg.keep_last > 0 else []:  # --keep-last N: the newest N stay
            old.unlink()

    @torch.no_grad()
    def grid(self, path):
        """PREVIEW_IMAGES samples of the EMA model (unit.preview) as one PNG, from the same noise and labels at every
        grid, so grids compare. The noise is drawn once, up front, and moved with one copy each."""
        cfg, model = self.cfg, self.unit.ema
        steps, size = PREVIEW[cfg.preview][0], model.x_embedder.input_size
        g = torch.Generator().manual_seed(cfg.seed)
        noise = torch.randn(PREVIEW_IMAGES, model.in_channels, size, size, generator=g)
        eps = torch.randn(steps - 1, *noise.shape, dtype=torch.float64, generator=g) if cfg.preview == 'sde' else None
        pin = (lambda v: v.pin_memory()) if self.device.type == 'cuda' else (lambda v: v)
        noise, eps = (None if v is None else pin(v).to(self.device, non_blocking=True) for v in (noise, eps))
        y = torch.arange(PREVIEW_IMAGES, device=self.device) % self.data.num_classes
        save_grid(to_uint8(self.unit.preview(noise, y, eps)), path, cols=PREVIEW_COLS)

    def finish(self):
        """The stop signals' handlers back as they were; a stopped run says why and where it stands, then exits with
        PREEMPTED (every rank, once its checkpoint is written); a finished one says what it did."""
        self.bar.close()
        if self.stop_work is not None:
            self.stop_work.wait()  # the last flag reduction: no rank leaves one in flight
        self.stop.release()
        if self.master:
            self.log.close()
            if self.wandb:
                self.wandb.finish()
        if self.stopped and self.rec['step'] < self.cfg.max_steps:
            why = (signal.Signals(self.stop.signal).name if self.stop.signal else f'--time-limit {self.cfg.time_limit}'
                   if self.deadline and time.time() > self.deadline else "another rank's stop signal")
            if self.master:
                print(f"stopped by {why} after step {self.rec['step']}: checkpoint {latest_checkpoint(self.out)}; "
                      f"continue with --resume (exit code {PREEMPTED}: requeue)", file=sys.stderr)
            raise SystemExit(PREEMPTED)
        if self.master and self.rec:
            print(self.summary())

    def summary(self):
        """The closing line, over the whole run as log.jsonl holds it (every process of a resumed run): steps, wall
        time (start-ups included), img/s while training, the loss from the first log to the last, the results."""
        log = [json.loads(line) for line in open(self.out / 'log.jsonl') if line.strip()]
        key = 'mse' if 'mse' in self.rec else 'flow'  # MeanFlow's weighted loss stays near 1; its plain error tells
        steps, prev, train_s = log[-1]['step'], 0, 0.0
        for r in log:  # older logs lack interval_s: the interval's steps at its steps/s
            train_s, prev = train_s + r.get('interval_s', (r['step'] - prev) / r['steps_per_s']), r['step']
        grids = f", samples in {self.out / 'samples'}" if self.cfg.sample_every > 0 else ''
        return (f"done: {steps} steps in {log[-1].get('wall_s', train_s) / 60:.1f} min wall time "
                f"({steps * self.cfg.global_batch_size / train_s:.1f} img/s while training); {key} loss "
                f"{log[0][key]:.4f} (first log) -> {log[-1][key]:.4f} (last), alignment {log[-1]['align']:.4f}; "
                f"checkpoint {latest_checkpoint(self.out)}{grids}"
                + (f"; the {self.world} ranks hold identical weights" if self.world > 1 else ''))
# =====================================================================================================================
# Part 5. The command line: every training flag and its help (the defaults: DEFAULTS and the recipe rows, Part 1)
# --demo: 16-px synthetic images, a tiny SiT, a random teacher where the real one is unavailable: minutes on 2 CPU
# cores, enough for the EMA model to draw class-coloured blobs. lr and EMA decay are raised for so few steps.
DEMO = dict(model='SiT-T/2', resolution=16, vae='none', max_steps=300, global_batch_size=16, lr=1e-3, ema_decay=0.99,
            log_every=25, ckpt_every=150, sample_every=150, num_workers=0, synthetic_size=2000, out_dir='out/demo',
            eval_samples=48, eval_steps=50)  # --eval-every N: a reference of its own, its first 48 images
DEMO_OBJECTIVE = {'repa-e': dict(vae='random:tiny', resolution=32),  # a VAE to train; the PatchGAN needs >= 24 px
                  'jit': dict(model='JiT-T/2', jit_warmup_epochs=0)}  # a tiny JiT at DEMO's lr from the first step
HELP = dict(  # the flags whose name and default do not say it all; RECIPES' comments explain the rest
    recipe=f"the method, a row of RECIPES: {', '.join(RECIPES)}",
    model='SiT-{T (tiny, ours),S,B,L,XL}/{2,4,8}; JiT-{T,B,L,H}/{2,4,16,32} (pixel space, JiT recipes)',
    encoder="teacher(s), comma-separated (python encoders.py --list); 'none': a plain SiT", proj_coeff='lambda',
    encoder_weights="'auto' (Hugging Face hub and its cache), local files (one per teacher), 'random[:BLOCKS]' (tests)",
    encoder_depth='aligned SiT block (1-based); default 4 (S, B), 8 (L, XL)', preview='grid sampler',
    spnorm_gamma='share of the token mean the z-score removes (paper: 1, LDM code: 0.6)', sample_every='0: no grids',
    siglip_norm="SigLIP's input stats: the paper's ImageNet ones or SigLIP's 0.5/0.5", num_classes='synthetic set',
    lpips_weights="REPA-E: 'auto', 'LINEAR[,VGG]' files (vgg.pth of LPIPS), or 'random'", synthetic_size='its images',
    disc_weights="REPA-E: 'random' or a PatchGAN state dict (REPA-E: a released one)",
    device="'auto' (CUDA if there is one), 'cpu', 'cuda' (torchrun: cuda:LOCAL_RANK) or 'cuda:N'",
    lpips_quirk='REPA-E feeds LPIPS [-1, 1] images although it expects [0, 1]; --no-lpips-quirk feeds [0, 1]',
    data_path='ImageNet-style folder (<root>/<class>/*.JPEG), a prepared latents folder, or none: the synthetic set',
    vae="'sd-vae-ft-mse', 'sd-vae-ft-ema', a local file, or 'none': pixel space", global_batch_size='all processes',
    latent_scale='latents times this constant (REPA: 0.18215) instead of the per-channel statistics',
    out_dir='config.json, log.jsonl, checkpoints/, samples/', demo=f'offline CPU demo; sets {DEMO}',
    compile='torch.compile the SiT and the teachers (inductor, on any device; default: on CUDA)',
    precision="'bf16' (autocast, bf16 teacher weights) or 'fp32'; default bf16 on CUDA, fp32 on CPU",
    grad_ckpt='activation checkpointing per SiT block: ~1/3 more compute, a fraction of the memory',
    teacher_cache='folder of the teachers\' tokens of every training image, computed once (built when absent)',
    prepare='encode --data-path, then exit',
    resume='continue from the newest checkpoint in --out-dir',
    overwrite="start afresh in an --out-dir holding another run: its files move to <out-dir>/replaced-<time>/",
    keep_last='keep only the newest N checkpoints, removing older ones once a new one is written (0: keep all)',
    time_limit=f"checkpoint and exit (code {PREEMPTED}) once this much time has passed, e.g. 3h55m for a 4-hour job",
    max_bad_fraction='stop when more than this fraction of the images drawn so far is unreadable',
    grad_floor=f'warn when a network\'s gradient norm stays below this for {GRAD_FLOOR_INTERVALS} log intervals',
    grad_jump='warn when a gradient norm changes by more than this factor from one log interval to the next',
    projector_dim='hidden width of the MLP projector', qk_norm='LayerNorm on queries and keys (steadier at high lr)',
    resolution='image side in pixels (a multiple of the VAE factor x patch size)', max_steps='training steps in all',
    lr='AdamW learning rate (constant; JiT: after warm-up, default jit_blr x batch / 256)',
    grad_clip='clip the gradient norm to this (0: no clipping)',
    ema_decay='decay of the EMA weights that sample', seed='data order, noise and initialization',
    log_every='steps between log.jsonl lines', ckpt_every='steps between checkpoints',
    num_workers='DataLoader processes per rank', proj_kernel='side of the conv projector\'s kernel (odd)',
    adam_beta2="AdamW's beta2", projector="'mlp' (REPA's 3 layers) or 'conv' (iREPA's one convolution)",
    spnorm="teacher tokens raw ('none') or spatially z-scored ('zscore', iREPA)",
    vae_align_coeff='REPA-E: weight of the alignment in the VAE step', vae_lr='REPA-E: learning rate of the VAE',
    disc_lr='REPA-E: learning rate of the discriminator', l1_coeff='REPA-E: weight of the L1 reconstruction loss',
    lpips_coeff='REPA-E: weight of LPIPS', kl_coeff='REPA-E: weight of the KL term', gan_coeff='REPA-E: weight of '
    'the GAN loss', repae_stats_images='REPA-E: images whose latents give the initial BatchNorm statistics',
    mf_p_mean='MeanFlow: mean of the logit-normal t, r', mf_p_std='MeanFlow: std of the logit-normal t, r',
    mf_ratio='MeanFlow: share of the rows with r != t', mf_norm_c='MeanFlow: c of the adaptive weight 1/sg(L+c)^p',
    mf_norm_p='MeanFlow: p of the adaptive weight', mf_label_drop='MeanFlow: share of labels dropped in the loss',
    mf_omega='MeanFlow: guidance scale trained in (omega)', mf_kappa='MeanFlow: kappa of the trained-in guidance',
    mf_t_start='MeanFlow: guidance applies for t from this', mf_t_end='MeanFlow: guidance applies for t up to this',
    jit_blr='JiT: base learning rate, per 256 images', jit_warmup_epochs='JiT: epochs of linear lr warm-up',
    jit_p_mean='JiT: mean of the logit-normal t', jit_p_std='JiT: std of the logit-normal t',
    jit_t_eps='JiT: floor of 1 - t in the velocity', jit_noise_scale='JiT: std of the noise',
    jit_label_drop='JiT: share of labels dropped in the loss', jit_ema_decay2="JiT: the second EMA's decay",
    eval_every='steps between FID evaluations of the EMA model (0: none; FID and IS go into log.jsonl)',
    eval_samples='images per evaluation, from the same seeds each time', eval_batch='images per shard and batch',
    eval_ref="reference batch .npz (ADM's: arr_0, stored mu/sigma used); --demo: its own", eval_cfg='guidance scale',
    eval_sampler='sampler of the evaluation (default: the --preview one)',
    eval_steps='its steps (default 250; meanflow 1; JiT 50)',
    inception=f"FID Inception weights (default: $IREPA_INCEPTION, the torch hub cache); 'random'",
    wandb='also log the records to this Weights & Biases project (needs the wandb package)')
TYPES = dict(encoder_depth=int, latent_scale=float, data_path=str, compile=bool, precision=str, time_limit=str,
             teacher_cache=str, eval_ref=str, eval_sampler=str, eval_steps=int, inception=str, wandb=str,
             lr=float)  # flags whose default is None (JiT's lr: jit_blr x batch / 256)
CHOICES = dict(recipe=RECIPES, model=MODELS + JIT_MODELS, projector=('mlp', 'conv'), spnorm=('none', 'zscore'),
               siglip_norm=('imagenet', 'siglip'), preview=PREVIEW, eval_sampler=PREVIEW)
EPILOG = '''commands (each with its own --help):
  python irepa.py recipes                  every recipe's settings side by side
  python irepa.py metrics --encoder NAME   a teacher's spatial-structure metrics (LDS, CDS, SRSS, RMSC) and LP accuracy
  python irepa.py correlate results.csv    the metrics' correlation with FID over teachers, and a scatter panel
  python irepa.py spnorm-viz               one token's similarity map before and after the spatial z-score
  python irepa.py export-vae CKPT OUT      the VAE a REPA-E run trained, as a file --vae reads
  python irepa.py plot RUN [RUN ...]       losses, gradient norms and FID of runs, overlaid, in one PNG
  python fid.py sample | eval              samples of a checkpoint; FID, sFID, IS, precision, recall'''

def get_parser(recipe=DEFAULTS['recipe'], demo=False):
    """Flags with no default of their own: parse_args returns the ones given, which then override the defaults. The
    help shows each flag's value for `recipe` (and --demo): python irepa.py --recipe repa-e --help."""
    p = ArgumentParser(prog='irepa.py', description=__doc__.split('\n\n')[0], allow_abbrev=False, epilog=EPILOG,
                       argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    row = RECIPES.get(recipe, RECIPES[DEFAULTS['recipe']])
    values = DEFAULTS | row | (DEMO | DEMO_OBJECTIVE.get(row['objective'], {}) if demo else {})
    settings = DEFAULTS | {k: v for row in RECIPES.values() for k, v in row.items() if k != 'objective'}
    for k, v in settings.items():
        kind = TYPES.get(k) or type(v)
        where = (f"{recipe}{' --demo' if demo else ''}: {values[k]}" if k in values else
                 f"not for {recipe}; recipes {', '.join(r for r, other in RECIPES.items() if k in other)}")
        p.add_argument('--' + k.replace('_', '-'), help=f"{HELP[k]} ({where})", choices=CHOICES.get(k),
                       metavar='NAME' if k == 'model' else None,  # not the 15 names in the usage line
                       **dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind))
    return p

def recipes(argv):
    """python irepa.py recipes: every recipe's settings side by side (the defaults that all share: irepa.py --help)."""
    p = study_parser('recipes', recipes.__doc__)
    p.parse_args(argv)
    print(f"{'setting':20s}" + ''.join(f"{r:>15s}" for r in RECIPES))
    for k in dict.fromkeys(k for row in RECIPES.values() for k in row):  # each setting once, in the rows' order
        print(f"{k:20s}" + ''.join(f"{str(row.get(k, DEFAULTS.get(k, '-'))):>15s}" for row in RECIPES.values()))

def resolve_config(argv=None):
    """The command line -> the run's config: DEFAULTS, the recipe's row, --demo's values, then every flag given, each
    overriding the ones before. It is printed, saved as config.json and stored in every checkpoint."""
    argv = list(argv if argv is not None else sys.argv[1:])
    named = [a.split('=', 1)[-1] if '=' in a else b for a, b in zip(argv, argv[1:] + ['']) if a.startswith('--recipe')]
    p = get_parser(named[-1] if named else DEFAULTS['recipe'], '--demo' in argv)  # the help shows their values
    given = vars(p.parse_args(argv))
    recipe = given.get('recipe', DEFAULTS['recipe'])
    row = RECIPES[recipe]
    for k in given.keys() - DEFAULTS.keys() - row.keys():  # a flag of another objective's recipes
        p.error(f"--{k.replace('_', '-')} does not apply to --recipe {recipe}; it belongs to "
                f"{', '.join(r for r, other in RECIPES.items() if k in other)}")
    demo = DEMO | DEMO_OBJECTIVE.get(row['objective'], {}) if given.get('demo') else {}
    cfg = DEFAULTS | row | demo | given
    device = torch_device(cfg['device'])  # 'cuda' -> 'cuda:LOCAL_RANK'; bad or missing devices: one line
    cfg['device'] = str(device)
    cfg['compile'] = device.type == 'cuda' if cfg['compile'] is None else cfg['compile']
    cfg['precision'] = cfg['precision'] or ('bf16' if device.type == 'cuda' else 'fp32')
    if cfg['precision'] not in ('bf16', 'fp32'):
        p.error(f"--precision {cfg['precision']}: use bf16 (or fp32). fp16 needs loss scaling (a GradScaler), which "
                "this trainer leaves out: bf16 (A100 and later) has fp32's range and needs none")
    if cfg['compile'] and (missing := compiler_missing(device.type)):
        p.error(f"--compile: torch.compile's inductor backend needs {missing}; install it or pass --no-compile")
    if cfg['teacher_cache'] and cfg['encoder'] in ('', 'none'):
        p.error("--teacher-cache caches the teachers' tokens, and --encoder none has no teacher")
    if cfg['time_limit'] is not None:
        try:
            seconds(cfg['time_limit'])
        except ValueError as e:
            p.error(f"--time-limit: {e}")
    return argparse.Namespace(**cfg)

# -----------------------------------------------------------------------------
# Validation: the whole configuration is checked in one pass before anything is printed or written, so a bad value is
# one line per mistake (all of them at once), exit code 2, not a traceback minutes into the run or a run of 0 steps.
# The interval each number must lie in ('[' and ']' include the end, '(' and ')' exclude it; inf is never allowed).
RANGES = dict(
    max_steps='[1, inf)', global_batch_size='[1, inf)', lr='[0, inf)', grad_clip='[0, inf)', ema_decay='[0, 1]',
    seed='[0, inf)', log_every='[1, inf)', ckpt_every='[1, inf)', sample_every='[0, inf)', num_workers='[0, inf)',
    keep_last='[0, inf)', resolution='[1, inf)', num_classes='[1, inf)', synthetic_size='[1, inf)',
    projector_dim='[1, inf)', latent_scale='(0, inf)', max_bad_fraction='[0, 1]', grad_floor='[0, inf)',
    grad_jump='(1, inf)', encoder_depth='[1, inf)', proj_kernel='[1, inf)', spnorm_gamma='[0, 1]',
    proj_coeff='[0, inf)', adam_beta2='[0, 1)', vae_align_coeff='[0, inf)', vae_lr='[0, inf)', disc_lr='[0, inf)',
    l1_coeff='[0, inf)', lpips_coeff='[0, inf)', kl_coeff='[0, inf)', gan_coeff='[0, inf)',
    repae_stats_images='[1, inf)', mf_p_mean='(-inf, inf)', mf_p_std='(0, inf)', mf_ratio='[0, 1]',
    mf_norm_c='(0, inf)', mf_norm_p='[0, inf)', mf_label_drop='[0, 1]', mf_omega='(0, inf)', mf_kappa='[0, 1)',
    mf_t_start='[0, 1]', mf_t_end='[0, 1]', jit_blr='[0, inf)', jit_warmup_epochs='[0, inf)', jit_p_mean='(-inf, inf)',
    jit_p_std='(0, inf)', jit_t_eps='(0, 1]', jit_noise_scale='(0, inf)', jit_label_drop='[0, 1]',
    jit_ema_decay2='[0, 1]', eval_every='[0, inf)', eval_samples='[2, inf)', eval_steps='[1, inf)',
    eval_cfg='[1, inf)', eval_batch='[1, inf)')
VAE_NAMES = {'sd-vae-ft-mse': 8, 'sd-vae-ft-ema': 8, 'random': 8, 'random:tiny': 2}  # the VAEs by name: their factor

def in_range(v, interval):
    lo, hi = (float(x) for x in interval[1:-1].split(','))
    above = v >= lo if interval[0] == '[' else v > lo
    return math.isfinite(v) and above and (v <= hi if interval[-1] == ']' else v < hi)

def check_numbers(cfg, world):
    """Each numeric setting in its interval; the batch split evenly over the processes."""
    flag = lambda k: '--' + k.replace('_', '-')
    cache_only = cfg.teacher_cache and cfg.max_steps == 0  # --max-steps 0 --teacher-cache DIR: the cache pass alone
    errors = [f"{flag(k)} must be in {r} (got {getattr(cfg, k)})" for k, r in RANGES.items()
              if getattr(cfg, k, None) is not None and not in_range(getattr(cfg, k), r)
              and not (k == 'max_steps' and cache_only)]
    if cfg.global_batch_size >= 1 and cfg.global_batch_size % world:
        errors.append(f"--global-batch-size must be a positive multiple of the number of processes, {world} "
                      f"(got {cfg.global_batch_size})")
    if cfg.proj_kernel % 2 == 0:
        errors.append(f"--proj-kernel must be odd, so the convolution keeps the token grid (got {cfg.proj_kernel})")
    if cfg.objective == 'meanflow' and cfg.mf_t_start > cfg.mf_t_end:
        errors.append(f"--mf-t-start {cfg.mf_t_start} is past --mf-t-end {cfg.mf_t_end}")
    if cfg.data_path is None and cfg.global_batch_size > cfg.synthetic_size >= 1 and not cfg.prepare:
        errors.append(f"--synthetic-size {cfg.synthetic_size} is smaller than one global batch "
                      f"({cfg.global_batch_size})")
    return errors

def check_shapes(cfg):
    """The model's token grid and aligned block: resolution / (VAE factor x patch size) whole, encoder depth <= depth;
    a JiT trains in pixel space with a JiT recipe, a SiT with the others."""
    jit, errors = cfg.model.startswith('JiT-'), []
    (depth, *_), patch = (JIT_SIZES if jit else SIZES)[cfg.model[4:].split('/')[0]], int(cfg.model.split('/')[1])
    if jit != (cfg.objective == 'jit'):
        errors.append(f"--model {cfg.model} is a JiT (pixel space): it trains with --recipe jit-repa or jit-irepa"
                      if jit else f"--recipe {cfg.recipe} trains a JiT: pass --model {JIT['model']} (or another of "
                      f"JiT-{{T,B,L,H}}/{{2,4,16,32}}), not the SiT {cfg.model}")
    if cfg.objective == 'jit' and (cfg.vae != 'none' or cfg.data_path and (Path(cfg.data_path) / 'meta.json').exists()):
        errors.append(f"--recipe {cfg.recipe} is pixel-space diffusion: it trains on images, without a --vae or "
                      f"prepared latents (got --vae {cfg.vae}, --data-path {cfg.data_path})")
    if cfg.objective == 'jit' and cfg.teacher_cache:
        errors.append(f"--recipe {cfg.recipe} flips every image at random each step, so cached teacher tokens (of the "
                      f"unflipped images) would be wrong for half of them: drop --teacher-cache")
    for flag, mode in (('--preview', cfg.preview), ('--eval-sampler', cfg.eval_sampler)):
        if cfg.objective == 'jit' and mode not in ('euler', 'heun', None):
            errors.append(f"{flag} {mode}: JiT samples with 'heun' or 'euler'")
    if cfg.encoder_depth is not None and cfg.encoder_depth > depth:
        errors.append(f"--encoder-depth {cfg.encoder_depth} is past the last block of {cfg.model}, which has {depth} "
                      f"(the aligned block must be in 1..{depth})")
    if cfg.objective == 'repa-e' and cfg.vae == 'none':
        errors.append(f"--recipe {cfg.recipe} trains the VAE end to end: it needs a --vae to start from, not 'none'")
    prepared = cfg.data_path and (Path(cfg.data_path) / 'meta.json').exists()  # its latents fix the grid
    factor = 1 if cfg.vae == 'none' else VAE_NAMES.get(cfg.vae)  # a local file's: known once it is read
    if cfg.resolution >= 1 and factor and not prepared and cfg.resolution % (factor * patch):
        errors.append(f"--resolution must be a multiple of {factor * patch}, the VAE's factor {factor} times the "
                      f"patch size {patch} of {cfg.model} (got {cfg.resolution})")
    if cfg.resume and cfg.overwrite:
        errors.append("--resume continues the run in --out-dir and --overwrite moves it aside: pass one of them")
    return errors

def writable(path):
    """Whether a folder can be made or written at `path`: its nearest existing ancestor is a writable folder."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)

def check_paths(cfg):
    """The input files and folders exist; the output folders can be written."""
    errors, files = [], []
    if cfg.data_path is not None and not Path(cfg.data_path).is_dir():
        errors.append(f"--data-path {cfg.data_path} is not a folder"
                      f"{'' if Path(cfg.data_path).exists() else ' (it does not exist)'}")
    files += [('--encoder-weights', w) for w in cfg.encoder_weights.split(',') if w not in ('auto', 'none', '')
              and not w.startswith('random')]
    files += [('--vae', cfg.vae)] if cfg.vae not in VAE_NAMES and cfg.vae != 'none' else []
    if cfg.objective == 'repa-e':
        files += [('--lpips-weights', w) for w in cfg.lpips_weights.split(',') if w not in ('auto', 'random', '')
                  and not cfg.demo]  # --demo: a missing LPIPS file gives random weights
        files += [('--disc-weights', cfg.disc_weights)] if cfg.disc_weights != 'random' else []
    errors += [f"{flag}: no weights file at '{f}'" for flag, f in files if not Path(f).is_file()]
    for flag, d in (('--out-dir', cfg.out_dir), ('--teacher-cache', cfg.teacher_cache)):
        if d is not None and Path(d).exists() and not Path(d).is_dir():
            errors.append(f"{flag} {d} is a file, not a folder")
        elif d is not None and not writable(d):
            errors.append(f"{flag} {d} cannot be written here (permissions, or a read-only file system)")
    return errors

def check_eval(cfg):
    """--eval-every: a reference of the run's resolution holding at least --eval-samples images, the Inception file
    (--demo: random where it is missing); --wandb: the package."""
    errors, ref, R = [], cfg.eval_ref, cfg.resolution
    if cfg.wandb and 'wandb' not in sys.modules and importlib.util.find_spec('wandb') is None:
        errors.append(f"--wandb {cfg.wandb}: the wandb package is not installed (pip install wandb)")
    try:
        if cfg.eval_every and cfg.inception != 'random' and not cfg.demo:
            encoders.find_inception(cfg.inception)
        n, h, w, _ = npz_header(ref) if cfg.eval_every and ref else (cfg.eval_samples, R, R, 3)
    except Exception as e:  # the Inception's LoadError; a reference that is no file, no npz, without arr_0
        return errors + [f"--eval-every: {e}" if isinstance(e, encoders.LoadError) else
                         f"--eval-ref {ref}: not an ADM .npz with arr_0 ({type(e).__name__}: {e})"]
    if cfg.eval_every and not ref and not cfg.demo:
        errors.append("--eval-every needs --eval-ref, the reference batch .npz (ADM's VIRTUAL_imagenet256_labeled.npz)")
    if (h, w) != (R, R):
        errors.append(f"--eval-ref {ref} holds {h}x{w} images; this run makes {R}x{R}")
    if cfg.eval_samples > n:
        errors.append(f"--eval-samples {cfg.eval_samples} is more than the {n} images --eval-ref {ref} holds")
    return errors

def validate(cfg):
    """Every mistake of the configuration at once, as one UserError (one line each); the same on every process of a
    torchrun job, so rank 0 alone prints it."""
    errors = check_numbers(cfg, int(os.environ.get('WORLD_SIZE', 1)))
    errors += check_shapes(cfg) + check_paths(cfg) + check_eval(cfg)
    if errors:
        raise UserError('; '.join(errors), errors, everywhere=True)

def rank_zero():
    """Whether this process speaks for a torchrun job (RANK unset: a plain python process)."""
    return int(os.environ.get('RANK', 0)) == 0

def cli(main, prog=None):
    """Run a command line's main(): a UserError or encoders.LoadError becomes 'prog: error: ...' on stderr (one line
    per error) and exit code 2, without a traceback."""
    try:
        return main()
    except (UserError, encoders.LoadError) as e:
        for bar in list(tqdm._instances):  # a progress bar in flight ends its line first
            bar.close()
        if rank_zero() or not getattr(e, 'everywhere', False):
            for line in getattr(e, 'errors', [str(e)]):
                print(f"{prog + ': ' if prog else ''}error: {line}", file=sys.stderr)
        sys.exit(2)

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes are one line, `prog: error: ...` (with the valid choices where there are
    some), not the usage block that pushes the error off the screen; under torchrun rank 0 alone says it."""
    def error(self, message):
        if rank_zero():
            hint = f" (see {self.prog} --help)" if 'unrecognized' in message or 'required' in message else ''
            print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(2)

COMMANDS = {'metrics': measure_teacher, 'correlate': correlate, 'spnorm-viz': spnorm_viz, 'export-vae': export_vae,
            'recipes': recipes, 'plot': plot}

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # the study commands; everything else trains (or prepares latents)
        return COMMANDS[argv[0]](argv[1:])
    cfg = resolve_config(argv)
    validate(cfg)  # every mistake at once, before anything is printed or written
    ddp, device = int(os.environ.get('WORLD_SIZE', 1)) > 1, torch.device(cfg.device)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # see Stop
    lock = None
    try:
        catch_startup_signals()  # until the loop takes over: a signal stops the start-up with PREEMPTED
        use_device(device)  # before the process group: NCCL binds to the current device
        if ddp:
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        lock = lock_run(Path(cfg.out_dir)) if dist_info()[0] == 0 else None  # one run per folder
        if dist_info()[0] == 0:
            print(json.dumps(vars(cfg), indent=1))
        if not cfg.prepare:
            return train(cfg)
        prepare_latents(cfg.data_path, cfg.out_dir, cfg.resolution, cfg.vae, device, cfg.num_classes, cfg.seed,
                        cfg.synthetic_size, num_workers=cfg.num_workers)
    except StartupStop as e:
        if dist_info()[0] == 0:
            print(f"stopped by {signal.Signals(e.args[0]).name} before {'the pass' if cfg.prepare else 'training'} "
                  f"began; nothing to keep (exit code {PREEMPTED}: requeue, with --resume)", file=sys.stderr)
        raise SystemExit(PREEMPTED) from None
    except SystemExit as e:  # under torchrun a worker's exit code is lost: PREEMPTED leaves a marker a job script tests
        if e.code == PREEMPTED and lock and 'TORCHELASTIC_RUN_ID' in os.environ:
            (Path(cfg.out_dir) / 'PREEMPTED').write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
        raise
    finally:
        for sig, handler in handlers.items():  # also when a run stops with an error (a caller's Ctrl-C works again)
            signal.signal(sig, handler)
        if lock:
            lock.close()  # releases the flock
        if ddp and dist.is_initialized():
            dist.destroy_process_group()

if __name__ == '__main__':
    cli(main, 'irepa.py')
