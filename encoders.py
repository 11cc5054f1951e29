"""
Everything pretrained that turns pixels into features: the frozen teachers of REPA/iREPA (through timm) with the
official code's exact preprocessing, and the SD-VAE (AutoencoderKL) with diffusers-compatible weights.

    import encoders
    teacher = encoders.load_teacher('dinov2', device='cuda', dtype=torch.bfloat16)  # HF hub weights (cached)
    teacher = encoders.load_teacher('mocov3', weights='mocov3_vitb.pth')            # a local file, any layout
    teacher = encoders.load_teacher('dinov3', weights='random:2')                   # untrained, 2 blocks
    tokens = teacher(images)           # (B, 3, R, R) in [0, 1] -> (B, 16*16, 768), CLS/registers dropped
    vae = encoders.load_vae('sd-vae-ft-ema')
    mean, std = vae.encode(x)          # x in [-1, 1], (B, 3, 256, 256) -> 2 x (B, 4, 32, 32)

    python encoders.py --list          # one row per teacher (built on the meta device: no weights, no download)

Every teacher is a timm model (or, for HOG and SIFT, a few lines of torch) plus one row of facts in TEACHERS; the
per-family quirks of the official code are data (resize mode and input size, normalization and its order, final norm
kept or not, how tokens form, which grids upstream allows). Where timm's defaults differ from what iREPA computes,
build_model says so: CLIP needs QuickGELU and no ln_post, MAE no final norm, PE a bilinear position embedding and RoPE
on the integer grid, SigLIP tanh-GELU, WebSSL and C-RADIO their own position-embedding resampling, SAM 2 no head, VGG
only up to pool4. Absolute position embeddings of the ViTs are resampled to the SiT grid at load (img_size), never
their features; SAM's and HOG's maps are resized to the grid as the official code does.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import sys
import warnings
import zipfile

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F


class LoadError(ValueError):
    """A teacher, VAE or weights file that cannot be loaded as asked: an unknown name, a missing or unfitting file. A
    mistake of the user, not of the code: irepa.py's and fid.py's command lines print it as one line, exit code 2."""


# -----------------------------------------------------------------------------
# The teachers: one table of facts. timm (and torchvision under it) takes seconds to import, so it is imported only
# where a teacher is built; `import encoders` stays cheap.

IN = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet mean, std
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NONE = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # HOG and SIFT see the pixels themselves
COLLECTIONS = 'REPA-E/iREPA-collections'  # the official repo's copies of the checkpoints timm does not host

# How the official code feeds each family. resize: F.interpolate mode to patch * grid pixels, no antialias, except
# 'bilinear-aa' (DINOv3's torchvision Resize(antialias=True)); norm_first: normalize before resizing (else after);
# final_norm: keep timm's last LayerNorm; grids: the only SiT grids upstream allows (it asserts resolution 256).
FAMILIES = {
    'dino':    dict(resize='bicubic', norm=IN, norm_first=True, final_norm=True),
    'dinov2':  dict(resize='bicubic', norm=IN, norm_first=True, final_norm=True),
    'dinov3':  dict(resize='bilinear-aa', norm=IN, norm_first=False, final_norm=True),
    'webssl':  dict(resize='bicubic', norm=IN, norm_first=True, final_norm=True),
    'mocov3':  dict(resize='bicubic', norm=IN, norm_first=True, final_norm=True, overlay=dict(num_classes=0)),
    'clip':    dict(resize='bicubic', norm=CLIP, norm_first=False, final_norm=False),  # tokens before ln_post
    'jepa':    dict(resize='bicubic', norm=IN, norm_first=True, final_norm=True),
    'mae':     dict(resize='bicubic', norm=IN, norm_first=True, final_norm=False, grids=(16,)),
    # SigLIP gets ImageNet stats in the official code (its issue #8); load_teacher(siglip_norm='siglip') uses 0.5/0.5.
    # global_pool='map' keeps timm's load strict (it relaxes it for SigLIP otherwise).
    'siglip':  dict(resize='bicubic', norm=IN, norm_first=True, final_norm=True, grids=(16,),
                    kw=dict(act_layer='gelu_tanh', global_pool='map')),
    'pe':      dict(resize='bilinear', norm=HALF, norm_first=False, final_norm=False),
    # The teachers that are not plain ViTs say how their tokens form (`tokens`, see Teacher.features) and, where the
    # input is not patch * grid pixels, its size: SAM always sees 1024 px and its 64x64 neck map is resized to the
    # grid; SAM2's Hiera trunk (stride 32, channels-last, no neck, no final norm) sees twice the SiT's resolution;
    # VGG16 gives its pool4 map (stride 16); HOG and SIFT are computed from the pixels, no weights.
    'sam':     dict(resize='bicubic', norm=IN, norm_first=False, final_norm=True, tokens='map', input=1024),
    'sam2':    dict(resize='bicubic', norm=IN, norm_first=False, final_norm=True, tokens='nhwc'),
    # C-RADIO normalizes inside the network with the mean/std stored in its checkpoint (the file's, when it has them)
    'cradio':  dict(resize='bilinear', norm=CLIP, norm_first=False, final_norm=False),  # (timm: no final norm)
    'vgg':     dict(resize='bilinear', norm=IN, norm_first=False, final_norm=True, tokens='map'),
    'hog':     dict(resize='bilinear', norm=NONE, norm_first=False, final_norm=True, tokens='map'),
    'sift':    dict(resize='bilinear', norm=NONE, norm_first=False, final_norm=True, tokens='map'),
}


def webssl(dim, depth, heads, repo):
    """WebSSL = DINOv2 with a SwiGLU MLP at every size; timm's giant DINOv2 has that block, only the sizes change."""
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # WebSSL's SwiGLU width; timm packs both halves into fc1
    return dict(kw=dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=(2 * hidden + 0.5) / dim),
                hub=(repo, 'model.safetensors'))


# name: (family, timm model, patch, dim, prefix tokens before the patches, extras). hub defaults to the timm tag's
# hf_hub_id / model.safetensors.
_ROWS = {
    'dino-vit-b':         ('dino',   'vit_base_patch16_224.dino', 16, 768, 1),
    'dinov2-vit-b':       ('dinov2', 'vit_base_patch14_dinov2.lvd142m', 14, 768, 1),
    'dinov2-vit-l':       ('dinov2', 'vit_large_patch14_dinov2.lvd142m', 14, 1024, 1),
    'dinov2-vit-g':       ('dinov2', 'vit_giant_patch14_dinov2.lvd142m', 14, 1536, 1),
    'dinov2reg-vit-b':    ('dinov2', 'vit_base_patch14_reg4_dinov2.lvd142m', 14, 768, 5),
    'dinov2reg-vit-l':    ('dinov2', 'vit_large_patch14_reg4_dinov2.lvd142m', 14, 1024, 5),
    'dinov2reg-vit-g':    ('dinov2', 'vit_giant_patch14_reg4_dinov2.lvd142m', 14, 1536, 5),
    'dinov3-vit-b16':     ('dinov3', 'vit_base_patch16_dinov3.lvd1689m', 16, 768, 5),
    'dinov3-vit-l16':     ('dinov3', 'vit_large_patch16_dinov3.lvd1689m', 16, 1024, 5),
    'dinov3-vit-h16plus': ('dinov3', 'vit_huge_plus_patch16_dinov3.lvd1689m', 16, 1280, 5),
    'dinov3-vit-7b16':    ('dinov3', 'vit_7b_patch16_dinov3.lvd1689m', 16, 4096, 5),
    'webssl-vit-dino300m_full2b_224': ('webssl', 'vit_giant_patch14_dinov2', 14, 1024, 1,
                                       webssl(1024, 24, 16, 'facebook/webssl-dino300m-full2b-224')),
    'webssl-vit-dino1b_full2b_224':   ('webssl', 'vit_giant_patch14_dinov2', 14, 1536, 1,
                                       webssl(1536, 40, 24, 'facebook/webssl-dino1b-full2b-224')),
    'webssl-vit-dino2b_full2b_224':   ('webssl', 'vit_giant_patch14_dinov2', 14, 2688, 1,
                                       webssl(2688, 24, 21, 'facebook/webssl-dino2b-full2b-224')),
    'webssl-vit-dino3b_full2b_224':   ('webssl', 'vit_giant_patch14_dinov2', 14, 3072, 1,
                                       webssl(3072, 26, 24, 'facebook/webssl-dino3b-full2b-224')),
    'webssl-vit-dino5b_full2b_224':   ('webssl', 'vit_giant_patch14_dinov2', 14, 3584, 1,
                                       webssl(3584, 32, 28, 'facebook/webssl-dino5b-full2b-224')),
    'webssl-vit-dino7b_full8b_224':   ('webssl', 'vit_giant_patch14_dinov2', 14, 4096, 1,
                                       webssl(4096, 32, 32, 'facebook/webssl-dino7b-full8b-224')),
    'mocov3-vit-b':       ('mocov3', 'vit_base_patch16_224', 16, 768, 1,
                           dict(hub=(COLLECTIONS, 'pretrained_models/mocov3_vitb.pth'))),
    'mocov3-vit-l':       ('mocov3', 'vit_large_patch16_224', 16, 1024, 1,
                           dict(hub=(COLLECTIONS, 'pretrained_models/mocov3_vitl.pth'))),
    'clip-vit-L':         ('clip',   'vit_large_patch14_clip_quickgelu_224.openai', 14, 1024, 1),  # QuickGELU as OpenAI
    'jepa-vit-h':         ('jepa',   'vit_huge_patch14_gap_224.in1k_ijepa', 14, 1280, 0,
                           dict(hub=(COLLECTIONS, 'pretrained_models/ijepa_vith.pth'))),  # timm has only a URL
    'mae-vit-l':          ('mae',    'vit_large_patch16_224.mae', 16, 1024, 1),
    'siglip-vit-b':       ('siglip', 'vit_base_patch16_siglip_256.webli', 16, 768, 0),
    'siglip-vit-l':       ('siglip', 'vit_large_patch16_siglip_256.webli', 16, 1024, 0),
    'siglip-vit-so400m':  ('siglip', 'vit_so400m_patch14_siglip_224.webli', 14, 1152, 0),
    'siglip2-vit-b':      ('siglip', 'vit_base_patch16_siglip_256.v2_webli', 16, 768, 0),
    'siglip2-vit-l':      ('siglip', 'vit_large_patch16_siglip_256.v2_webli', 16, 1024, 0),
    'siglip2-vit-so400m': ('siglip', 'vit_so400m_patch16_siglip_256.v2_webli', 16, 1152, 0),
    'siglip2-vit-g':      ('siglip', 'vit_giantopt_patch16_siglip_256.v2_webli', 16, 1536, 0),
    'pe-vit-b':           ('pe',     'vit_pe_core_base_patch16_224.fb', 16, 768, 1),
    'pe-vit-l':           ('pe',     'vit_pe_core_large_patch14_336.fb', 14, 1024, 1),
    'pe-vit-g':           ('pe',     'vit_pe_core_gigantic_patch14_448.fb', 14, 1536, 0),
    'langpe-vit-l':       ('pe',     'vit_pe_lang_large_patch14_448.fb', 14, 1024, 1),
    'langpe-vit-g':       ('pe',     'vit_pe_lang_gigantic_patch14_448.fb', 14, 1536, 0),
    'spatialpe-vit-b':    ('pe',     'vit_pe_spatial_base_patch16_512.fb', 16, 768, 1),
    'spatialpe-vit-l':    ('pe',     'vit_pe_spatial_large_patch14_448.fb', 14, 1024, 1),
    'spatialpe-vit-g':    ('pe',     'vit_pe_spatial_gigantic_patch14_448.fb', 14, 1536, 0),
    # the small sizes of the families above (MoCo v3's ViT-S has 12 heads, timm's vit_small 6)
    'dino-vit-s':         ('dino',   'vit_small_patch16_224.dino', 16, 384, 1),
    'dinov2-vit-s':       ('dinov2', 'vit_small_patch14_dinov2.lvd142m', 14, 384, 1),
    'dinov2reg-vit-s':    ('dinov2', 'vit_small_patch14_reg4_dinov2.lvd142m', 14, 384, 5),
    'dinov3-vit-s16':     ('dinov3', 'vit_small_patch16_dinov3.lvd1689m', 16, 384, 5),
    'dinov3-vit-s16plus': ('dinov3', 'vit_small_plus_patch16_dinov3.lvd1689m', 16, 384, 5),
    'mocov3-vit-s':       ('mocov3', 'vit_small_patch16_224', 16, 384, 1,
                           dict(kw=dict(num_heads=12), hub=(COLLECTIONS, 'pretrained_models/mocov3_vits.pth'))),
    'pe-vit-t':           ('pe',     'vit_pe_core_tiny_patch16_384.fb', 16, 192, 1),
    'pe-vit-s':           ('pe',     'vit_pe_core_small_patch16_384.fb', 16, 384, 1),
    # PE with its final LayerNorm (ln_post) applied: the official `*norm` configs
    **{f'pe-vit-{s}norm': ('pe', m, p, d, c, dict(final_norm=True)) for s, m, p, d, c in [
        ('t', 'vit_pe_core_tiny_patch16_384.fb', 16, 192, 1), ('s', 'vit_pe_core_small_patch16_384.fb', 16, 384, 1),
        ('b', 'vit_pe_core_base_patch16_224.fb', 16, 768, 1), ('l', 'vit_pe_core_large_patch14_336.fb', 14, 1024, 1),
        ('g', 'vit_pe_core_gigantic_patch14_448.fb', 14, 1536, 0)]},
    # the CLS-mixing experiment: tokens = alpha * cls + (1 - alpha) * patch, both after the final norm
    'dinov2mixed-vit-b':  ('dinov2', 'vit_base_patch14_dinov2.lvd142m', 14, 768, 1, dict(tokens='mix', alpha=0.1)),
    # patch = input pixels per token. SAM: the neck's 256 channels; SAM2: the last Hiera stage (the file is SAM 2,
    # not 2.1, as the official code loads facebook/sam2-hiera-*)
    'sam-vit-b':          ('sam',    'samvit_base_patch16.sa1b', 16, 256, 0),
    'sam-vit-l':          ('sam',    'samvit_large_patch16.sa1b', 16, 256, 0),
    'sam-vit-h':          ('sam',    'samvit_huge_patch16.sa1b', 16, 256, 0),
    'sam2-vit-s':         ('sam2',   'sam2_hiera_small.fb_r896', 32, 768, 0),
    'sam2-vit-b':         ('sam2',   'sam2_hiera_base_plus.fb_r896', 32, 896, 0),
    'sam2-vit-l':         ('sam2',   'sam2_hiera_large.fb_r1024', 32, 1152, 0),
    # C-RADIO v3 from NVIDIA's own files: timm's hub copies hold a position table already resampled for 512 px
    'cradio-vit-b':       ('cradio', 'vit_base_patch16_radio_v3', 16, 768, 8,
                           dict(hub=('nvidia/C-RADIOv3-B', 'model.safetensors'))),
    'cradio-vit-l':       ('cradio', 'vit_large_patch16_radio_v3', 16, 1024, 8,
                           dict(hub=('nvidia/C-RADIOv3-L', 'model.safetensors'))),
    # VGG16 up to pool4 (features[:24]); the official weights are torchvision's IMAGENET1K_FEATURES, not timm's tag
    'vgg16':              ('vgg',    'vgg16', 16, 512, 0,
                           dict(hub=('https://download.pytorch.org/models', 'vgg16_features-amdegroot-88682ab5.pth'))),
    # no weights: HOG with 8 orientations, 2-px cells, 4x4-cell blocks (the official hog-hog-g16_d128); dense SIFT on
    # the 16-px grid (sift-kornia-dense16)
    'hog':                ('hog',    'none', 16, 128, 0),
    'sift':               ('sift',   'none', 16, 128, 0),
}
TEACHERS = {name: dict(FAMILIES[fam], family=fam, timm=model, patch=patch, dim=dim, prefix=prefix, **dict(*extra))
            for name, (fam, model, patch, dim, prefix, *extra) in _ROWS.items()}
ALIASES = {
    'dino': 'dino-vit-b', 'dinov2': 'dinov2-vit-b', 'dinov2reg': 'dinov2reg-vit-b', 'dinov3': 'dinov3-vit-b16',
    'dinov3-vit-b': 'dinov3-vit-b16', 'dinov3-vit-l': 'dinov3-vit-l16', 'dinov3-vit-h': 'dinov3-vit-h16plus',
    'dinov3-vit-7b': 'dinov3-vit-7b16', 'mocov3': 'mocov3-vit-b', 'clip': 'clip-vit-L', 'jepa': 'jepa-vit-h',
    'mae': 'mae-vit-l', 'siglip': 'siglip-vit-b', 'siglip2': 'siglip2-vit-b', 'pe': 'pe-vit-b',
    'langpe': 'langpe-vit-l', 'spatialpe': 'spatialpe-vit-b', 'webssl': 'webssl-vit-dino300m_full2b_224',
    **{n.rsplit('_', 2)[0]: n for n in _ROWS if n.startswith('webssl')},  # webssl-vit-dino1b, ...
    'sam': 'sam-vit-b', 'sam2': 'sam2-vit-s', 'cradio': 'cradio-vit-b', 'vgg': 'vgg16',
    'dinov2mixed': 'dinov2mixed-vit-b',
    'vgg-vgg16-pool4': 'vgg16', 'hog-hog-g16_d128': 'hog', 'sift-kornia-dense16': 'sift',  # official names
    # the official code accepts these *norm names, but their final norm is an identity: they equal the plain ones
    **{f'{n}norm': n for n in ('langpe-vit-l', 'langpe-vit-g', 'spatialpe-vit-b', 'spatialpe-vit-l',
                                'spatialpe-vit-g')},
}


def resolve_teacher(name):
    """Canonical teacher name for a canonical name or alias (case-insensitive)."""
    names = {n.lower(): n for n in TEACHERS} | {a.lower(): n for a, n in ALIASES.items()}
    if name.lower() not in names:
        raise LoadError(f"unknown teacher '{name}'. Teachers: {', '.join(TEACHERS)}. "
                        f"Aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())}")
    return names[name.lower()]

# -----------------------------------------------------------------------------
# Weights: the HF hub (with its cache), local files, and converters for the layouts timm does not read itself


def read_state_dict(path, expected='a state dict of tensors (.safetensors, .pth, .bin or .pt)'):
    """The tensors of a weights file; one that does not load (truncated, empty, another format) is one error line
    naming the file and what was `expected` there."""
    if not os.path.isfile(path):
        raise LoadError(f"no weights file at '{path}'")
    try:
        return read_tensors(path)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"'{path}' does not load ({type(e).__name__}: {' '.join(str(e).split())[:200]}); expected "
                        f"{expected}") from None


def read_tensors(path):
    if str(path).endswith('.safetensors'):
        return safetensors.torch.load_file(path)
    if zipfile.is_zipfile(path) and any('/code/' in n for n in zipfile.ZipFile(path).namelist()):
        # a TorchScript archive (OpenAI's ViT-L-14.pt, what clip.load downloads): only torch.jit reads it; we keep its
        # tensors, not its program (torch 2.14 calls torch.jit deprecated: the file format is what users have)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)
            return dict(torch.jit.load(path, map_location='cpu').state_dict())
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # the file pickles objects, not just tensors and plain containers
        raise LoadError(f"'{path}' holds more than tensors and plain containers, so it is not loaded (weights_only). "
                        f"If you trust it, re-save its state dict: torch.save(torch.load(p, weights_only=False)"
                        f"['state_dict'], 'clean.pth')") from e


def hub_location(name):
    """(repo, filename) of a teacher's weights on the HF hub: the table's, else the timm tag's model.safetensors."""
    import timm
    t = TEACHERS[name]
    return t.get('hub') or (timm.models.get_pretrained_cfg(t['timm']).hf_hub_id, 'model.safetensors')


def hub_files(repo, filename, what, how):
    """Local paths of `filename` in `repo` through the HF cache (downloading when online); a sharded checkpoint comes
    back as its shards. Offline and not cached: an error naming the repo, the file, and `how` to pass it instead."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    try:
        try:
            return [hf_hub_download(repo, filename)]
        except EntryNotFoundError as e:  # the hub says no such file: large HF checkpoints are sharded
            if isinstance(e, LocalEntryNotFoundError) or filename != 'model.safetensors':
                raise
            with open(hf_hub_download(repo, 'model.safetensors.index.json')) as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
            return [hf_hub_download(repo, shard) for shard in shards]
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise LoadError(
            f"{what}: cannot get '{filename}' from https://huggingface.co/{repo} (not in the Hugging Face cache, and "
            f"the hub is unreachable, gated or refused: {type(e).__name__}). Download it where you have network "
            f"(`hf download {repo} {filename}`) and {how}") from e


def url_files(url, filename, what, how):
    """A file that is not on the HF hub (torchvision's VGG16 features) through the torch hub cache, downloading it
    there when online; else an error naming the URL and `how` to pass it instead."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', filename)
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(f'{url}/{filename}', path)
        except Exception as e:
            raise LoadError(f"{what}: '{filename}' is not in {os.path.dirname(path)} and {url}/{filename} is "
                            f"unreachable ({type(e).__name__}). Download it where you have network and "
                            f"{how}") from e
    return [path]


def mocov3_to_timm(ckpt):
    """MoCo v3 (RCG) checkpoint -> timm ViT keys: keep the base encoder, drop momentum encoder, predictor and head."""
    sd = ckpt.get('state_dict', ckpt)
    if not any(k.startswith('module.base_encoder.') for k in sd):
        return ckpt  # already timm layout
    out = {}
    for k, v in sd.items():
        if not k.startswith('module.base_encoder.'):
            continue
        k = k[len('module.base_encoder.'):]
        for bad, good in [('blocks.13.norm13', 'blocks.13.norm1'), ('blocks.13.mlp.fc13', 'blocks.13.mlp.fc1'),
                          ('blocks.14.norm14', 'blocks.14.norm2'), ('blocks.14.mlp.fc14', 'blocks.14.mlp.fc2')]:
            k = k.replace(bad, good)  # a naming bug in the released ViT-L checkpoint (fixed the same way upstream)
        if 'head' not in k and k.split('.')[0] != 'fc':
            out[k] = v
    return out


def webssl_to_timm(sd):
    """WebSSL checkpoint -> timm DINOv2 keys, from the HF `Dinov2Model` safetensors or the native (chunked) .pth."""
    sd = {k.removeprefix('dinov2.'): v for k, v in sd.items()}
    if 'embeddings.cls_token' not in sd:  # native .pth: blocks.<chunk>.<i>.* -> blocks.<i>.*; timm's own filter then
        return {re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k): v for k, v in sd.items()}  # maps w12/w3, mask_token
    renames = [('embeddings.cls_token', 'cls_token'), ('embeddings.position_embeddings', 'pos_embed'),
               ('embeddings.patch_embeddings.projection', 'patch_embed.proj'), ('encoder.layer.', 'blocks.'),
               ('attention.output.dense', 'attn.proj'), ('layer_scale1.lambda1', 'ls1.gamma'),
               ('layer_scale2.lambda1', 'ls2.gamma'), ('mlp.weights_in', 'mlp.fc1'), ('mlp.weights_out', 'mlp.fc2'),
               ('layernorm.', 'norm.')]
    out = {}
    for k, v in sd.items():
        if k != 'embeddings.mask_token':
            for a, b in renames:
                k = k.replace(a, b)
            out[k] = v
    for k in [k for k in out if 'attention.attention.query.' in k]:  # separate q, k, v -> timm's fused qkv
        out[k.replace('attention.attention.query', 'attn.qkv')] = torch.cat(
            [out.pop(k.replace('query', n)) for n in ('query', 'key', 'value')])
    return out


# Hugging Face transformers files (what the official code loads with from_pretrained) -> timm keys: a tensor that
# marks the layout (its key's start is the vision tower's prefix in that file: `vision_model.` in a SiglipModel, none
# in a SiglipVisionModel saved by transformers 5), then (HF name, timm name) renames; q/k/v are fused into timm's qkv.
HF_LAYOUTS = {
    'siglip': ('embeddings.patch_embedding.weight', [  # SiglipModel / SiglipVisionModel (SigLIP, SigLIP 2 fixed-res)
        ('embeddings.patch_embedding', 'patch_embed.proj'), ('embeddings.position_embedding.weight', 'pos_embed'),
        ('encoder.layers.', 'blocks.'), ('layer_norm1', 'norm1'), ('layer_norm2', 'norm2'),
        ('self_attn.out_proj', 'attn.proj'), ('post_layernorm', 'norm'), ('head.probe', 'attn_pool.latent'),
        ('head.attention.out_proj', 'attn_pool.proj'), ('head.layernorm', 'attn_pool.norm'),
        ('head.mlp', 'attn_pool.mlp')]),
    'sam': ('patch_embed.projection.weight', [  # SamModel / SamVisionModel (vision_encoder.*)
        ('patch_embed.projection', 'patch_embed.proj'), ('layers.', 'blocks.'), ('layer_norm1', 'norm1'),
        ('layer_norm2', 'norm2'), ('mlp.lin1', 'mlp.fc1'), ('mlp.lin2', 'mlp.fc2'), ('neck.conv1', 'neck.0'),
        ('neck.norm1', 'neck.1'), ('neck.conv2', 'neck.2'), ('neck.norm2', 'neck.3')]),
    'sam2': ('patch_embed.projection.weight', [  # Sam2Model (vision_encoder.backbone.*) / Sam2VisionModel: the trunk
        ('patch_embed.projection', 'patch_embed.proj'), ('layer_norm1', 'norm1'), ('layer_norm2', 'norm2'),
        ('mlp.proj_in', 'mlp.fc1'), ('mlp.proj_out', 'mlp.fc2')]),
}


def hf_to_timm(sd, family):
    """A transformers checkpoint of `family` -> timm keys; any other layout passes through unchanged."""
    marker, renames = HF_LAYOUTS[family]
    prefix = next((k[:-len(marker)] for k in sd if k.endswith(marker) and 'text' not in k), None)
    if prefix is None:
        return sd
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue  # the text tower, prompt encoder, mask decoder, SAM 2's FPN neck, ...
        k = k[len(prefix):].replace('neck.layer_norm', 'neck.norm')
        for a, b in renames:
            k = k.replace(a, b)
        out[k] = v
    if 'pos_embed' in out and family == 'siglip':
        out['pos_embed'] = out['pos_embed'][None]  # (N, D) -> (1, N, D)
    for k in [k for k in out if '.self_attn.q_proj.' in k]:  # separate q, k, v -> fused qkv
        names = [k.replace('q_proj', n) for n in ('q_proj', 'k_proj', 'v_proj')]
        missing = [n for n in names if n not in out]
        if missing:  # named as in the file
            i = int(re.search(r'blocks\.(\d+)\.', k)[1])
            raise ValueError(f"the Hugging Face file lacks {prefix}encoder.layers.{i}.{missing[0].split('.', 2)[2]}")
        out[k.replace('self_attn.q_proj', 'attn.qkv')] = torch.cat([out.pop(n) for n in names])
    for p in ('weight', 'bias'):  # SigLIP's pooling head: MultiheadAttention's packed [q; k; v] -> timm's q, kv
        if f'head.attention.in_proj_{p}' in out:
            q, kv = out.pop(f'head.attention.in_proj_{p}').tensor_split([out['attn_pool.latent'].shape[-1]])
            out[f'attn_pool.q.{p}'], out[f'attn_pool.kv.{p}'] = q, kv
    return out


def resample_posemb(pos_embed, prefix, grid, mode):
    """Resample an absolute position embedding (1, prefix + n*n, D) to grid x grid as the teacher's own code does,
    in fp32, no antialias: PE bilinear, WebSSL (HF Dinov2Model) bicubic, C-RADIO bilinear; timm would do bicubic
    with antialias, which is another function when upsampling."""
    pre, pos = pos_embed[:, :prefix], pos_embed[:, prefix:]
    n, D = math.isqrt(pos.shape[1]), pos.shape[2]
    pos = pos.reshape(1, n, n, D).permute(0, 3, 1, 2).float()  # (1, D, n, n)
    pos = F.interpolate(pos, size=(grid, grid), mode=mode, align_corners=False)
    return torch.cat([pre, pos.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_embed.dtype)], dim=1)


def cradio_to_timm(sd):
    """NVIDIA's C-RADIO file (radio_model.model.*) -> timm keys (timm's own converter, without its resampling), and
    the input mean/std the file stores; a timm-layout file passes through."""
    import timm.models.vision_transformer as vit
    stats = [sd.get(f'radio_model.input_conditioner.norm_{k}') for k in ('mean', 'std')]
    if 'radio_model.model.patch_generator.embedder.weight' in sd:
        sd = vit._convert_radio(sd, None)
    return sd, (None if stats[0] is None else tuple(tuple(v.flatten().tolist()) for v in stats))

# -----------------------------------------------------------------------------
# The weight-free teachers: HOG (scikit-image's algorithm) and dense SIFT (kornia's), in torch


class HOG(nn.Module):
    """Dense HOG as the official hog-hog-g16_d128 computes it with scikit-image: grey (Rec.709 luma) -> central
    differences (zero at the border) -> unsigned orientation (0-180 deg) hard-binned into 8 bins, magnitude averaged
    over 2x2-px cells -> every 4x4-cell block L2-Hys normalized (eps 1e-5, clip 0.2) -> (B, 128, R/2 - 3, R/2 - 3),
    then L2 per position. Histograms in fp64 like scikit-image: the bin of a pixel on an edge must not flip."""
    orientations, cell, block = 8, 2, 4

    def forward(self, x):  # x (B, 3, R, R) in [0, 1]
        v = x.float().clamp(0, 1) * 255  # the official code works on 0-255 values; same float32 operation order
        g = (0.2126 * v[:, 0] + 0.7152 * v[:, 1] + 0.0722 * v[:, 2]) / 255  # (B, R, R)
        gr, gc = torch.zeros_like(g), torch.zeros_like(g)
        gr[:, 1:-1], gc[:, :, 1:-1] = g[:, 2:] - g[:, :-2], g[:, :, 2:] - g[:, :, :-2]
        gr, gc = gr.double(), gc.double()
        mag = torch.hypot(gr, gc)
        ori = torch.rad2deg(torch.atan2(gr, gc)) % 180  # [0, 180]; exactly 180 (from -0.0) falls in no bin
        edges = torch.arange(1, self.orientations, device=x.device, dtype=torch.float64) * (180 / self.orientations)
        bins = (ori[..., None] >= edges).sum(-1)  # (B, R, R): the comparisons scikit-image makes
        onehot = bins[..., None] == torch.arange(self.orientations, device=x.device)  # not F.one_hot: it syncs on CUDA
        onehot = onehot.double() * (mag * (ori < 180))[..., None]  # (B, R, R, 8)
        hist = F.avg_pool2d(onehot.permute(0, 3, 1, 2), self.cell)  # (B, 8, R/2, R/2): cell means
        B, O, n, _ = hist.shape
        k, m = self.block, n - self.block + 1
        blocks = F.unfold(hist, k).view(B, O, k, k, m * m)  # (B, 8, 4, 4, m*m): every 4x4-cell window
        blocks = blocks.permute(0, 4, 2, 3, 1).reshape(B, m * m, k * k * O)  # (B, m*m, 128) in (row, col, bin) order
        blocks = blocks / torch.sqrt(blocks.square().sum(-1, keepdim=True) + 1e-10)  # L2-Hys: eps 1e-5 squared
        blocks = blocks.clamp(max=0.2)
        blocks = (blocks / torch.sqrt(blocks.square().sum(-1, keepdim=True) + 1e-10)).float()
        blocks = F.normalize(blocks, dim=-1)  # the official code's L2 per token
        return blocks.transpose(1, 2).reshape(B, k * k * O, m, m)  # (B, 128, m, m)

def gaussian(n, sigma):
    """Normalized 1-D Gaussian on n taps centred on the window (half-integer offsets for even n), as kornia's."""
    x = torch.arange(n, dtype=torch.float32) - n // 2 + (0.5 if n % 2 == 0 else 0.0)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def gradient(x, sobel):
    """kornia's normalized spatial gradient of (N, 1, H, W) with replicate padding: Sobel / 8 or central
    differences / 2 -> gx, gy."""
    d = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    s = torch.tensor([1.0, 2.0, 1.0] if sobel else [0.0, 1.0, 0.0], device=x.device) / (8 if sobel else 2)
    k = torch.stack([torch.outer(s, d), torch.outer(d, s)])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), k.to(x.dtype))
    return g[:, 0], g[:, 1]  # (N, H, W) each


def soft_orientation_bins(gx, gy, weight, bins, eps, offset):
    """kornia's gradient histogram votes: magnitude (Gaussian-weighted) split linearly between the two nearest of
    `bins` orientation bins -> (N, bins, H, W). offset pi: the orienter's bins start at -pi. As kornia 0.8.1 (the
    official environment's), a flat pixel votes too: magnitude sqrt(eps), angle atan2(0, eps) = 0 (0.9.0 drops it)."""
    mag = torch.sqrt(gx * gx + gy * gy + eps) * weight
    ori = torch.atan2(gy, gx + eps) + 2 * math.pi
    o = bins * (ori + offset) / (2 * math.pi)
    b0 = torch.floor(o)
    w1 = o - b0
    b0 = b0.long() % bins
    idx = torch.arange(bins, device=gx.device)  # one-hot by comparison: F.one_hot checks its input (a host sync)
    b0, b1 = b0[..., None], (b0[..., None] + 1) % bins  # the two bins each pixel votes for
    votes = (b0 == idx) * ((1 - w1) * mag)[..., None] + (b1 == idx) * (w1 * mag)[..., None]  # (N, H, W, bins)
    return votes.permute(0, 3, 1, 2)  # (N, H, W, bins) -> (N, bins, H, W)


class SIFT(nn.Module):
    """Dense SIFT as the official sift-kornia-dense16 computes it with kornia 0.8.1 (the version its environment pins;
    0.9.0 changed the patch sampling, the pooling cells and the votes of flat pixels): grey (0.299/0.587/0.114), one
    keypoint at the centre of every 16-px cell (scale 16), its dominant orientation from a 20x20 patch (36-bin
    Sobel-gradient histogram, circularly smoothed, parabolic peak: kornia's LAFOrienter), then a rotated 41x41 patch
    (bilinear, border-clamped) described by kornia's SIFTDescriptor (8 angles x 4x4 cells, clip 0.2, no RootSIFT) ->
    L2 -> (B, 128, grid, grid). Both patches span the keypoint +- 16 px (times W / (W - 1), see patches)."""

    def __init__(self, grid):
        super().__init__()
        self.grid = grid
        c = torch.arange(8, 16 * grid, 16, dtype=torch.float32)  # keypoint centres, pixels
        self.register_buffer('centres', torch.stack(torch.meshgrid(c, c, indexing='ij')[::-1], -1).view(-1, 2),
                             persistent=False)  # (T, 2) as (x, y), row-major
        # the histogram's smoothing: the discrete Gaussian exp(-t) I_n(t), t = 1.6^2, n = -2..2, normalized, as kornia
        # 0.8.1 computes it in float32 (polynomial approximations of I_n): the exact kernel differs in the last bit,
        # and a last bit can turn a near-tie between two orientation bins
        disc = torch.tensor([0.119062498, 0.231123596, 0.299627781, 0.231123596, 0.119062498])
        self.register_buffer('smooth', disc.view(1, 1, 5), persistent=False)
        for name, n, sigma in [('w_ori', 20, 20 / 6), ('w_desc', 41, 41 / math.sqrt(2))]:
            g = gaussian(n, sigma)
            self.register_buffer(name, torch.outer(g, g), persistent=False)
        # kornia 0.8.1's SIFT pooling: a 16x16 bilinear (tent) kernel, stride 10, padding 4 -> 4x4 cells whose grid
        # sits half a pixel off the patch centre (0.9.0 centres it: 17x17, padding 3)
        ks_2 = 16 / 2
        tent = ks_2 - (torch.arange(16, dtype=torch.float32) + 0.5 - ks_2).abs()
        self.register_buffer('pool', (torch.outer(tent, tent) / ks_2 ** 2).view(1, 1, 16, 16), persistent=False)

    def patches(self, gray, angle, size):
        """Bilinear patches (B*T, 1, size, size) around the keypoints, rotated by angle (B, T) radians, in kornia
        0.8.1's arithmetic (the official environment's): the angle goes through degrees, the frame is the LAF
        [16 R | centre], R = [[cos, sin], [-sin, cos]], scaled to the image and back, and affine_grid's sample at
        offset u in (-1, 1) is p = centre + 16 R u in pixels. kornia 0.8.1 maps p to grid_sample's frame with
        2 p / (W - 1) - 1 but samples with align_corners=False, so it reads the image at p W / (W - 1) - 1/2, not at
        p (0.9.0 reads at p): the official tokens come from there."""
        B, _, H, W = gray.shape
        T = self.centres.shape[0]
        pi = torch.tensor(math.pi)  # float32, as kornia's constant
        angle = 180 * angle / pi * pi / 180  # to degrees (LAFOrienter) and back (the rotation matrix)
        cos, sin = torch.cos(angle), torch.sin(angle)
        frame = 16 * torch.stack([cos, sin, -sin, cos], -1).view(B, T, 2, 2)  # (B, T, 2, 2)
        laf = torch.cat([frame, self.centres.expand(B, T, 2)[..., None]], -1)  # (B, T, 2, 3)
        laf = laf * torch.tensor(1 / (W - 1)) * (W - 1)  # kornia's normalize_laf and denormalize_laf (H = W)
        grid = F.affine_grid(laf.view(B * T, 2, 3), [B * T, 1, size, size], align_corners=False)  # (BT, s, s, 2)
        grid = 2 * grid / (W - 1) - 1  # kornia 0.8.1's frame (see above)
        out = F.grid_sample(gray, grid.view(B, T * size, size, 2), padding_mode='border', align_corners=False)
        return out.view(B, T, size, size).reshape(B * T, 1, size, size)

    def forward(self, x):  # x (B, 3, R, R) in [0, 1], R = 16 * grid
        x = x.float()
        gray = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]  # (B, 1, R, R), kornia 0.8.1's rgb_to_grayscale
        B, T = x.shape[0], self.centres.shape[0]
        # 1. dominant orientation of each keypoint (kornia's PatchDominantGradientOrientation on a 20x20 patch)
        p = self.patches(gray, torch.zeros(B, T, device=x.device), 20)
        gx, gy = gradient(p, sobel=True)
        votes = soft_orientation_bins(gx, gy, self.w_ori, 36, 1e-8, math.pi).contiguous()  # (B*T, 36, 20, 20)
        hist = F.adaptive_avg_pool2d(votes, 1).flatten(1)  # (B*T, 36): kornia's mean, in its summation order
        hist = F.conv1d(F.pad(hist[:, None], (2, 2), mode='circular'), self.smooth)[:, 0]  # (B*T, 36)
        peak, i = hist.max(1)
        left, right = hist.gather(1, ((i - 1) % 36)[:, None])[:, 0], hist.gather(1, ((i + 1) % 36)[:, None])[:, 0]
        denom = left + right - 2 * peak
        sub = torch.where(denom != 0, 0.5 * (left - right) / denom, torch.zeros_like(denom))  # 0.8.1: NaN at 0 / 0
        angle = -(2 * math.pi * (i.float() + sub) / 36 - math.pi)  # radians, (B*T,): the patch's x axis turns onto it
        # 2. the SIFT descriptor of the rotated 41x41 patch
        p = self.patches(gray, angle.view(B, T), 41)
        gx, gy = gradient(p, sobel=False)
        votes = soft_orientation_bins(gx, gy, self.w_desc, 8, 1e-10, 0.0)  # (B*T, 8, 41, 41)
        cells = F.conv2d(votes.reshape(B * T * 8, 1, 41, 41), self.pool, stride=10, padding=4)  # (B*T*8, 1, 4, 4)
        d = F.normalize(cells.view(B * T, 128), dim=1).clamp(0, 0.2)
        d = F.normalize(F.normalize(d, dim=1), dim=1)  # kornia's second L2, then the official code's own
        return d.view(B, self.grid, self.grid, 128).permute(0, 3, 1, 2)  # (B, T, 128) -> (B, 128, grid, grid)

# -----------------------------------------------------------------------------
# Building a teacher: timm model + the official preprocessing, frozen


def build_model(name, grid=16, state_dict=None, depth=None):
    """The network of teacher `name` for a grid x grid token map, random or loaded (strictly) from `state_dict`."""
    import timm
    t, fam = TEACHERS[name], TEACHERS[name]['family']
    if fam == 'hog':
        return HOG()
    if fam == 'sift':
        return SIFT(grid)
    kw = dict(t.get('kw', {}))
    if fam not in ('sam', 'sam2', 'vgg'):  # SAM runs at its 1024 px; Hiera and VGG have no fixed input size
        kw['img_size'] = t['patch'] * grid  # timm resamples abs pos_embed to this size at load
    if depth is not None and fam == 'sam2':
        kw['stages'] = (1, 1, depth, 1)  # Hiera counts blocks per stage; four stages keep the stride 32
    elif depth is not None and fam != 'vgg':
        kw['depth'] = depth
    model_name = t['timm']
    if state_dict is not None:
        for key in ('model', 'state_dict'):  # a training checkpoint (Meta's SAM 2 .pt, ...): its weights
            state_dict = state_dict[key] if isinstance(state_dict.get(key), dict) else state_dict
        state_dict = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v  # fp32 like the official
                      for k, v in state_dict.items()}  # loaders, before any resampling: fp16 files (OpenAI's CLIP)
    if fam == 'pe':
        kw['ref_feat_shape'] = (grid, grid)  # RoPE on the actual integer grid as PE does (timm rescales to pretrain's)
        if state_dict is not None and 'pos_embed' not in state_dict:  # original Meta PE layout -> timm keys
            state_dict = timm.models.eva.checkpoint_filter_fn(state_dict, None)  # (this converter ignores the model)
    mode = dict(pe='bilinear', webssl='bicubic', cradio='bilinear').get(fam)  # their own resampling, not timm's
    if mode and state_dict is not None and 'pos_embed' in state_dict:
        prefix = 0 if fam == 'cradio' else t['prefix']  # C-RADIO's table covers the patches only
        if state_dict['pos_embed'].shape[1] != prefix + grid * grid:
            state_dict = dict(state_dict, pos_embed=resample_posemb(state_dict['pos_embed'], prefix, grid, mode))
    if fam == 'dinov3' and state_dict is not None and 'storage_tokens' in state_dict:
        # original Meta .pth: the plain timm variant would silently drop its q/v biases, the _qkvb variant keeps them
        arch, tag = model_name.split('.')
        model_name = f'{arch}_qkvb.{tag}' if timm.is_model(f'{arch}_qkvb') else model_name
    if fam in ('sam2', 'vgg'):  # the files hold no classifier (SAM2) or one we do not use (VGG): cut, then load
        if fam == 'sam2':
            model = timm.create_model(model_name.split('.')[0], pretrained=False, **kw)
            model.head = nn.Identity()  # tokens = the last stage, channels-last, no norm (HF last_hidden_state)
            prefix, keep = 'image_encoder.trunk.', lambda k: not k.startswith('head.')
        else:  # conv1_1 ... pool4: stride 16, 512 channels; built on meta, as the 120M-parameter classifier goes
            with torch.device('meta'):
                model = timm.create_model(model_name, pretrained=False).features[:24]
            model = model.to_empty(device=torch.empty(0).device)  # the caller's device (meta or not)
            for conv in [m for m in model if isinstance(m, nn.Conv2d) and m.weight.device.type != 'meta']:
                nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')  # timm's VGG init
                nn.init.zeros_(conv.bias)
            prefix, keep = 'features.', lambda k: int(k.split('.')[0]) < 24
        if state_dict is not None:
            if any(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict = {k.replace('mlp.layers.0', 'mlp.fc1').replace('mlp.layers.1', 'mlp.fc2'): v
                          for k, v in state_dict.items() if keep(k)}
            model.load_state_dict(state_dict, strict=True)
        return model
    overlay = dict(t.get('overlay', {}), **({} if state_dict is None else dict(state_dict=state_dict)))
    model = timm.create_model(model_name, pretrained=state_dict is not None, pretrained_cfg_overlay=overlay, **kw)
    if not t['final_norm']:
        model.norm = nn.Identity()  # not final_norm=False at creation: pretrained weights hold norm.* (strict load)
    return model


class Teacher(nn.Module):
    """A frozen network behind its family's preprocessing: images (B, 3, R, R) in [0, 1] -> (B, grid*grid, D)."""

    def __init__(self, name, model, grid, norm):
        super().__init__()
        t = TEACHERS[name]
        self.name, self.model, self.grid = name, model, grid
        self.patch, self.dim, self.prefix = t['patch'], t['dim'], t['prefix']
        self.input_size = t.get('input') or self.patch * grid
        self.resize, self.norm_first = t['resize'], t['norm_first']
        self.tokens, self.alpha = t.get('tokens', 'vit'), t.get('alpha')  # alpha: CLS mixing, settable
        self.register_buffer('mean', torch.tensor(norm[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(norm[1]).view(1, 3, 1, 1), persistent=False)
        self.checked = False  # the [0, 1] range check costs a host sync, so it runs on the first call only
        self.compiled = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always eval: a parent's .train() must not switch the teacher

    def preprocess(self, x):
        """Resize to the teacher's input size with the family's mode and normalize, in the official code's order."""
        S = self.input_size
        if self.norm_first:
            x = (x - self.mean) / self.std
        if x.shape[-2:] != (S, S):
            mode, aa = ('bilinear', True) if self.resize == 'bilinear-aa' else (self.resize, False)
            x = F.interpolate(x, size=(S, S), mode=mode, align_corners=False, antialias=aa)
        if not self.norm_first:
            x = (x - self.mean) / self.std
        return x

    def features(self, images):
        param = next(self.model.parameters(), None)  # HOG and SIFT have none: fp32
        x = self.preprocess(images.float()).to(param.dtype if param is not None else torch.float32)
        out = getattr(self.model, 'forward_features', self.model)(x)
        if self.tokens == 'vit':
            return out[:, self.prefix:]  # (B, prefix + grid*grid, D) -> (B, grid*grid, D)
        if self.tokens == 'mix':  # the CLS-mixing experiment: every patch token takes alpha of the CLS token
            return self.alpha * out[:, :1] + (1 - self.alpha) * out[:, self.prefix:]  # (B, grid*grid, D)
        if self.tokens == 'nhwc':
            return out.flatten(1, 2)  # (B, grid, grid, D) -> (B, grid*grid, D)
        g = self.grid  # 'map': a (B, D, h, w) feature map, resized to the grid bilinearly as the official code does
        if out.shape[-2:] != (g, g):
            out = F.interpolate(out, size=(g, g), mode='bilinear', align_corners=False)
        return out.flatten(2).transpose(1, 2)  # (B, D, grid, grid) -> (B, grid*grid, D)

    @torch.no_grad()
    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"teacher {self.name} takes float images (B, 3, R, R) in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if not self.checked and images.device.type != 'meta':
            lo, hi = images.aminmax()
            if hi > 1.5 or lo < -0.5:
                raise ValueError(f"teacher {self.name} takes images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]: "
                                 f"divide uint8 images by 255, map [-1, 1] images with (x + 1) / 2")
            self.checked = True
        return (self.compiled or self.features)(images)

    def flops(self):
        """Forward FLOPs per image. ViTs: 2 (weights of the blocks' matmuls) N + 4 L N^2 D for QK^T and AV, N = prefix
        + grid^2 tokens (DINOv2-B at 224 px: 46 GFLOP); the patch embedding (< 0.5%) is left out. The others: counted
        by torch on a meta-device copy (no weights, no compute)."""
        if self.tokens in ('vit', 'mix'):
            n, blocks = self.prefix + self.grid ** 2, self.model.blocks
            matmul = sum(q.numel() for q in blocks.parameters() if q.dim() == 2)
            return 2 * matmul * n + 4 * len(blocks) * n * n * self.dim
        from torch.utils.flop_counter import FlopCounterMode
        with torch.device('meta'):
            twin = Teacher(self.name, build_model(self.name, self.grid), self.grid, TEACHERS[self.name]['norm'])
        with FlopCounterMode(display=False) as counter:
            twin.features(torch.empty(1, 3, self.input_size, self.input_size, device='meta'))
        return counter.get_total_flops()


WEIGHT_FREE = ('hog', 'sift')  # families computed from the pixels alone
FILES = {  # the layouts each family reads besides timm's own (model.safetensors of the timm/ hub repos), for errors
    'dino': "timm or DINO's .pth", 'dinov2': "timm or Meta's torch.hub .pth", 'dinov3': "timm or Meta's .pth",
    'webssl': "HF Dinov2Model safetensors or the native .pth", 'mocov3': "timm or RCG's mocov3_vit*.pth",
    'clip': "timm, OpenAI's TorchScript ViT-L-14.pt or its state dict", 'jepa': "timm or I-JEPA's .pth.tar",
    'mae': "timm or MAE's .pth", 'siglip': "timm or HF SiglipModel / SiglipVisionModel safetensors",
    'pe': "timm or Meta's PE .pt", 'sam': "timm, HF SamModel safetensors or Meta's sam_vit_*.pth",
    'sam2': "timm, HF Sam2Model safetensors or Meta's sam2_hiera_*.pt", 'cradio': "NVIDIA's C-RADIOv3 safetensors",
    'vgg': "torchvision's vgg16 .pth (or timm's vgg16)"}


def teachers_like(sd):
    """For error messages: the ViT teachers whose width and patch size match a (converted) state dict."""
    w = (sd or {}).get('patch_embed.proj.weight')
    if w is None or w.dim() != 4:
        return []
    prefix = sum(sd[k].shape[1] for k in ('cls_token', 'reg_token', 'storage_tokens') if k in sd and sd[k].dim() == 3)
    return [n for n, t in TEACHERS.items() if (t['dim'], t['patch']) == (w.shape[0], w.shape[-1])
            and t.get('tokens', 'vit') == 'vit' and t['prefix'] == prefix]


def check_teacher(name, grid=16, siglip_norm='imagenet', **_):
    """The canonical name of a teacher that can run on a grid x grid token map; else the error, before any file."""
    name = resolve_teacher(name)
    t = TEACHERS[name]
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if grid not in t.get('grids', (grid,)):
        raise LoadError(f"teacher {name} supports only grid {t['grids'][0]} ({t['patch'] * 16}-px input, as the "
                        f"official code asserts it), got grid {grid}")
    if siglip_norm not in ('imagenet', 'siglip'):
        raise ValueError(f"siglip_norm: 'imagenet' (as the official code) or 'siglip' (0.5/0.5), not {siglip_norm!r}")
    return name


def load_teacher(name, weights='auto', grid=16, device='cpu', dtype=None, compile=False, siglip_norm='imagenet'):
    """A frozen teacher yielding (B, grid*grid, D) tokens. weights: 'auto' (HF hub and its cache), a local file in the
    original or timm layout, 'random' or 'random:N' (random init, N blocks; tests and the offline demo only)."""
    name, weights = check_teacher(name, grid, siglip_norm), str(weights)
    t = TEACHERS[name]
    norm = HALF if siglip_norm == 'siglip' and t['family'] == 'siglip' else t['norm']
    depth, sd, source = None, None, weights
    if t['family'] in WEIGHT_FREE:
        if weights not in ('auto', 'none') and not weights.startswith('random'):
            raise LoadError(f"teacher {name} has no weights (computed from the pixels); got weights '{weights}'")
    elif weights == 'random' or weights.startswith('random:'):
        depth = int(weights.split(':')[1]) if ':' in weights else None
        print(f"*** WARNING: teacher {name} has RANDOM weights ({weights}): its tokens mean nothing. "
              f"Use this only for tests and the offline demo. ***", file=sys.stderr)
    else:
        if weights == 'auto':
            repo, filename = hub_location(name)
            get = url_files if repo.startswith('https://') else hub_files
            paths = get(repo, filename, f"teacher {name}", "pass it with --encoder-weights PATH")
            source = f'{repo}/{filename}'
        else:
            paths = [weights]
        expected = f"the weights of teacher {name} (timm {t['timm']})"
        sd = {k: v for p in paths for k, v in read_state_dict(p, expected).items()}
        sd = mocov3_to_timm(sd) if t['family'] == 'mocov3' else webssl_to_timm(sd) if t['family'] == 'webssl' else sd
        try:
            sd = hf_to_timm(sd, t['family']) if t['family'] in HF_LAYOUTS else sd
        except ValueError as e:
            raise LoadError(f"weights '{source}' do not fit teacher {name}: {e}") from e
        if t['family'] == 'cradio':
            sd, stats = cradio_to_timm(sd)
            norm = stats or norm
    with torch.device('meta') if str(device) == 'meta' else contextlib.nullcontext():
        try:
            model = build_model(name, grid, sd, depth)
        except (RuntimeError, KeyError, ValueError) as e:  # missing/unexpected keys or shape mismatches (strict load)
            if sd is None:
                raise
            like = [n for n in teachers_like(sd) if n != name]
            like = f": the file looks like {', '.join(like)}" if like else ''
            raise LoadError(f"weights '{source}' do not fit teacher {name} (timm {t['timm']}, width {t['dim']})"
                            f"{like}. {name} reads {FILES.get(t['family'], 'timm')} files. "
                            f"timm says: {' '.join(str(e).split())[:600]}") from e
    teacher = Teacher(name, model, grid, norm).to(device)
    if dtype is not None and t['family'] not in WEIGHT_FREE:  # HOG and SIFT compute in fp32 (fp64 histograms)
        teacher.model.to(dtype)
    if compile:
        teacher.compiled = torch.compile(teacher.features)
    return teacher


def load_teachers(names, weights='auto', demo=False, **kw):
    """The teachers of a comma-separated list ('none' or '': no teacher), with one weights entry or one per teacher;
    kw as load_teacher's. demo=True: a teacher whose 'auto' weights are unavailable becomes HOG (real spatial
    features that need no weights), and the run says so; an unknown name or a grid the teacher does not support is an
    error in demo mode too: only the weights may be missing."""
    names = [check_teacher(n, **kw) for n in names.split(',') if n and n != 'none']  # before any weights are fetched
    weights = weights.split(',')
    if len(weights) not in (1, len(names)):
        raise LoadError(f"--encoder-weights has {len(weights)} entries for {len(names)} teachers; "
                        "give one or one per teacher")
    teachers = []
    for name, w in zip(names, weights * len(names) if len(weights) == 1 else weights):
        try:
            teachers.append(load_teacher(name, w, **kw))
        except Exception as e:
            if not (demo and w == 'auto'):
                raise
            print(f"\n{'!' * 80}\n!! --demo: the weights of {name} are not available here ({type(e).__name__}: {e}).\n"
                  f"!! Using the weight-free HOG teacher instead (real, but not {name}'s, features).\n"
                  f"{'!' * 80}\n", file=sys.stderr)
            teachers.append(load_teacher('hog', 'auto', **kw))
    return teachers

# -----------------------------------------------------------------------------
# SD-VAE: AutoencoderKL with diffusers' state-dict names and config fields, so its checkpoints load with strict=True

SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32)  # f8d4: 8x downsampling, 4 latent channels
TINY_VAE = dict(SD_VAE, block_out_channels=(32, 64), layers_per_block=1)  # f2d4, for fast tests


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the h*w latent positions, with a residual (the VAE's mid block)."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers' to_out.1 is a parameter-free dropout

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None]  # (B, 1, H*W, C): one head
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C)
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(c, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Resample(nn.Module):
    def __init__(self, c, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # diffusers pads right and bottom only, then a stride-2 conv


class Stage(nn.Module):
    """diffusers' DownEncoderBlock2D / UpDecoderBlock2D: `n` ResNet blocks, then optionally a 2x down- or upsampler."""

    def __init__(self, cin, cout, n, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if resample == 'down':
            self.downsamplers = nn.ModuleList([Resample(cout, up=False)])
        if resample == 'up':
            self.upsamplers = nn.ModuleList([Resample(cout, up=True)])

    def forward(self, x):
        for m in [*self.resnets, *getattr(self, 'downsamplers', []), *getattr(self, 'upsamplers', [])]:
            x = m(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cin, cout, chs, n, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Stage(chs[max(i - 1, 0)], c, n, groups, 'down' if i < len(chs) - 1 else None)
                                          for i, c in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cout, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cin, cout, chs, n, groups):
        super().__init__()
        rev = chs[::-1]  # the decoder climbs back from the widest stage, with one more ResNet block per stage
        self.conv_in = nn.Conv2d(cin, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList([Stage(rev[max(i - 1, 0)], c, n + 1, groups, 'up' if i < len(rev) - 1 else None)
                                        for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, chs[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[0], cout, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32):
        super().__init__()
        chs = tuple(block_out_channels)
        self.config = dict(in_channels=in_channels, out_channels=out_channels,  # diffusers' field names and values
                           down_block_types=('DownEncoderBlock2D',) * len(chs),
                           up_block_types=('UpDecoderBlock2D',) * len(chs), block_out_channels=chs,
                           layers_per_block=layers_per_block, act_fn='silu', latent_channels=latent_channels,
                           norm_num_groups=norm_num_groups)
        self.args = dict(in_channels=in_channels, out_channels=out_channels, block_out_channels=list(chs),
                         layers_per_block=layers_per_block, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups)
        self.latent_channels, self.downsample = latent_channels, 2 ** (len(chs) - 1)
        self.encoder = Encoder(in_channels, 2 * latent_channels, chs, layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, chs, layers_per_block, norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def encode(self, x):
        """x in [-1, 1], (B, 3, H, W) -> posterior mean and std, each (B, C, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode(self, z):
        """(B, C, h, w) latents -> (B, 3, h*f, w*f) images in about [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        """Encode, sample the posterior, decode: (mean, std, z, reconstruction), for training the VAE (REPA-E)."""
        mean, std = self.encode(x)
        z = mean + std * torch.randn_like(std)
        return mean, std, z, self.decode(z)


def load_vae(spec='sd-vae-ft-mse', device='cpu'):
    """spec: 'sd-vae-ft-mse' | 'sd-vae-ft-ema' (HF hub, cached), a local diffusers-format state dict (.safetensors,
    .bin, .pt) with the SD f8d4 config, 'random' (SD config) or 'random:tiny' (f2d4, tests)."""
    if spec in ('random', 'random:tiny'):
        print(f"*** WARNING: the VAE has RANDOM weights ({spec}): its latents mean nothing. ***", file=sys.stderr)
        with torch.random.fork_rng(devices=[]):  # always the same random VAE: the one that encodes (on every rank)
            torch.manual_seed(0)                # is the one that decodes, in another process
            return AutoencoderKL(**(TINY_VAE if spec == 'random:tiny' else SD_VAE)).to(device)
    path = spec
    if spec in ('sd-vae-ft-mse', 'sd-vae-ft-ema'):
        path, = hub_files(f'stabilityai/{spec}', 'diffusion_pytorch_model.safetensors', f"VAE {spec}",
                          "pass the local path instead of the name")
    old = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}  # diffusers' pre-0.14 names
    sd = {re.sub(r'attentions\.0\.(query|key|value|proj_attn)\.', lambda m: f'attentions.0.{old[m[1]]}.', k): v
          for k, v in read_state_dict(path, 'a diffusers AutoencoderKL state dict (SD f8d4)').items()}
    config = SD_VAE  # diffusers files carry no config; `irepa.py export-vae` writes its own into the metadata
    if str(path).endswith('.safetensors'):
        with safetensors.safe_open(path, 'pt') as f:
            config = json.loads((f.metadata() or {}).get('config', 'null')) or SD_VAE
    with torch.device('meta'):  # no random init: every tensor comes from the file
        vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict(sd, assign=True)
    except RuntimeError as e:
        raise LoadError(f"'{path}' is not a diffusers AutoencoderKL state dict with the config {config} "
                        f"(SD f8d4 unless the file's metadata says otherwise): {' '.join(str(e).split())[:600]}") from e
    return vae.float().to(device)  # fp32 whatever the file holds


def export_vae(ckpt_path, out):
    """The VAE of an irepa.py REPA-E checkpoint -> a safetensors file in diffusers' layout with its config (and the
    EMA statistics of its latent BatchNorm) in the metadata, which load_vae reads back."""
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    if not isinstance(ckpt, dict) or 'vae' not in ckpt:
        raise LoadError(f"{ckpt_path} holds no trained VAE: "
                        "export-vae needs a checkpoint of --recipe repa-e or irepa-e")
    norm = ckpt['latent']  # irepa.LatentNorm.to_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in ckpt['vae'].items()}, out, metadata=dict(
        config=json.dumps(norm['vae_args']), latent_mean=json.dumps(norm['mean']), latent_std=json.dumps(norm['std'])))
    print(f"wrote the VAE of {ckpt_path} (step {ckpt['step']}) to {out}; its latents' BatchNorm statistics (EMA): "
          f"mean {[round(v, 4) for v in norm['mean']]}, std {[round(v, 4) for v in norm['std']]}")


# -----------------------------------------------------------------------------
# REPA-E's VAE regularizer networks: LPIPS (VGG16 through timm + learned linear layers) and the PatchGAN discriminator

LPIPS_FILE, LPIPS_MD5 = 'vgg.pth', 'd507d7349b931f0638a25a48a722f98a'  # the learned linear layers (taming, lpips v0.1)
LPIPS_WHERE = ("the `lpips` pip package ships it as lpips/weights/v0.1/vgg.pth; taming-transformers downloads it from "
               "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1")


class LPIPS(nn.Module):
    """LPIPS with VGG16: unit-normalized channel differences at relu1_2 ... relu5_3, weighted by learned 1x1 convs,
    averaged over space and summed over layers; (B, 3, H, W) x 2 -> (B,). Like upstream, it maps its inputs with
    2x - 1, i.e. it expects [0, 1]; REPA-E feeds it [-1, 1] images (a quirk that irepa.py reproduces by default)."""

    def __init__(self, vgg):
        super().__init__()
        self.vgg = vgg  # timm features_only VGG16: the five relu outputs
        self.register_buffer('shift', torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen network, always eval

    def forward(self, a, b):
        fa, fb = [self.vgg(((x * 2 - 1) - self.shift) / self.scale) for x in (a, b)]
        unit = lambda f: f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
        return sum(lin((unit(x) - unit(y)).square()).mean((1, 2, 3)) for lin, x, y in zip(self.lins, fa, fb))


def load_lpips(spec='auto', device='cpu', demo=False):
    """spec: 'auto' (VGG16 from timm's hub, the linear layers from $IREPA_LPIPS, the torch hub cache or the `lpips`
    package), 'LINEAR[,VGG]' local files, or 'random' (tests, loudly). demo=True: missing files give random weights."""
    import timm
    if demo and spec != 'random':
        try:
            return load_lpips(spec, device)
        except LoadError as e:
            print(f"\n!! --demo: {e}\n!! Using RANDOM LPIPS weights instead.\n", file=sys.stderr)
            spec = 'random'
    vgg_kw = dict(features_only=True, out_indices=(0, 1, 2, 3, 4))
    if spec == 'random':
        print("*** WARNING: LPIPS has RANDOM weights: its distances mean nothing. ***", file=sys.stderr)
        lpips = LPIPS(timm.create_model('vgg16', pretrained=False, **vgg_kw))
        for lin in lpips.lins:
            nn.init.uniform_(lin.weight, 0, 0.2)  # learned LPIPS weights are non-negative
        return lpips.to(device)
    linear, _, vgg = spec.partition(',') if spec != 'auto' else ('', '', '')
    if not linear:
        import importlib.util
        pkg = importlib.util.find_spec('lpips')
        candidates = [os.environ.get('IREPA_LPIPS', ''), os.path.join(torch.hub.get_dir(), 'checkpoints', LPIPS_FILE),
                      os.path.join(os.path.dirname(pkg.origin), 'weights', 'v0.1', LPIPS_FILE) if pkg else '']
        linear = next((p for p in candidates if p and os.path.isfile(p)), None)
        if linear is None:
            raise LoadError(f"LPIPS: no {LPIPS_FILE} (md5 {LPIPS_MD5}) in $IREPA_LPIPS, {candidates[1]} or the lpips "
                            f"package: {LPIPS_WHERE}. Pass it with --lpips-weights PATH")
    if not vgg:
        vgg, = hub_files('timm/vgg16.tv_in1k', 'model.safetensors', 'LPIPS VGG16', 'pass --lpips-weights LINEAR,VGG')
    model = timm.create_model('vgg16.tv_in1k', pretrained=True, pretrained_cfg_overlay=dict(file=vgg), **vgg_kw)
    lpips = LPIPS(model)
    lins = read_state_dict(linear, f'the LPIPS linear layers ({LPIPS_FILE})')
    sd = {f'{m[1]}.weight': v for k, v in lins.items()  # lin<k>.model.<1: after a dropout>.weight
          if (m := re.fullmatch(r'lin(\d)\.model\.\d\.weight', k))}
    lpips.lins.load_state_dict(sd, strict=True)
    return lpips.to(device)


class PatchGAN(nn.Module):
    """The taming/pix2pix NLayerDiscriminator (3 layers, 64 filters, BatchNorm): a logit per overlapping patch."""

    def __init__(self, ndf=64, n_layers=3):
        super().__init__()
        chs = [3] + [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]  # 3, 64, 128, 256, 512
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):  # the last of these keeps the resolution (stride 1)
            layers += [nn.Conv2d(chs[n], chs[n + 1], 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(chs[n + 1]), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(chs[-1], 1, 4, 1, 1))
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if min(x.shape[-2:]) < 24:
            raise ValueError(f"the PatchGAN discriminator needs images of at least 24 px, got {tuple(x.shape)}")
        return self.main(x)


def load_discriminator(spec='random', device='cpu'):
    """'random' (taming's init; REPA-E starts from a released pretrained one) or a local state dict file (keys main.*,
    or a REPA-E checkpoint holding 'discriminator')."""
    disc = PatchGAN()
    if spec != 'random':
        sd = read_state_dict(spec, 'a PatchGAN discriminator state dict')
        sd = sd.get('discriminator', sd)
        try:
            disc.load_state_dict(sd)
        except RuntimeError as e:
            raise LoadError(f"'{spec}' is not a PatchGAN discriminator (3 layers, 64 filters): "
                            f"{' '.join(str(e).split())[:400]}") from e
    return disc.to(device)


# -----------------------------------------------------------------------------
# The FID Inception (fid.py; irepa.py's evaluation while training): torchvision's Inception3 with the TF graph's
# quirks (pytorch-fid's FIDInceptionA/C/E_1/E_2). torchvision takes seconds to import: only where one is built.
INCEPTION_FILE = 'pt_inception-2015-12-05-6726825d.pth'
INCEPTION_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + INCEPTION_FILE
INCEPTION_ALT_FILE = 'weights-inception-2015-12-05-6726825d.pth'  # torch-fidelity's copy, same tensors and hash prefix
INCEPTION_SHA256 = '6726825d'  # torch.hub's convention: the file name carries the SHA-256 prefix


def resize_tf1(x, size=299):
    """TF1 ResizeBilinear(align_corners=False) without half-pixel centres, as the ADM graph resizes: source coordinate
    = dst * (in / out) in float32, lerped in TF's order (columns, then rows). F.interpolate uses half-pixel centres,
    a ~0.07 px shift at 256 -> 299. x: (N, C, H, W) float."""
    def coords(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32, device=x.device)  # TF computes the scale in float32
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        lo = src.long()  # floor, src >= 0
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo
    ylo, yhi, fy = coords(x.shape[2])
    xlo, xhi, fx = coords(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]  # (N, C, size, W) each
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * fx  # (N, C, size, size)
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * fx
    return top + (bottom - top) * fy[:, None]


def _tf_mixed(m, x, pool='avg'):
    """Forward of torchvision's InceptionA/C/E block `m` as in the TF graph; returns (output, branch1x1 output).
    TF's average pool ignores the zero padding, and Mixed_7c's pool branch is a max pool in the graph."""
    def chain(*names):
        y = x
        for name in names:
            y = getattr(m, name)(y)
        return y
    pooled = F.max_pool2d(x, 3, 1, 1) if pool == 'max' else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    if hasattr(m, 'branch5x5_1'):  # InceptionA
        mid = [chain('branch5x5_1', 'branch5x5_2'), chain('branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3')]
    elif hasattr(m, 'branch7x7_1'):  # InceptionC
        mid = [chain(*[f'branch7x7_{i}' for i in (1, 2, 3)]), chain(*[f'branch7x7dbl_{i}' for i in (1, 2, 3, 4, 5)])]
    else:  # InceptionE: both inner branches split into a 1x3 and a 3x1 conv
        a, b = m.branch3x3_1(x), chain('branch3x3dbl_1', 'branch3x3dbl_2')
        mid = [m.branch3x3_2a(a), m.branch3x3_2b(a), m.branch3x3dbl_3a(b), m.branch3x3dbl_3b(b)]
    b1 = m.branch1x1(x)
    return torch.cat([b1, *mid, m.branch_pool(pooled)], 1), b1


def spatial_features(b1):
    """ADM's sFID feature 'mixed_6/conv'[..., :7]: Mixed_6d.branch1x1 (N, 192, 17, 17) -> (N, 2023), (h, w, c) order."""
    return b1[:, :7].permute(0, 2, 3, 1).reshape(len(b1), -1)  # (N, 17, 17, 7) -> (N, 2023)


class FIDInception(nn.Module):
    """The 2015-12-05 TF Inception; state-dict keys are those of pt_inception-2015-12-05-6726825d.pth: the layers of
    torchvision's Inception3, taken over as they are (torchvision is imported here, not with encoders)."""

    def __init__(self):
        super().__init__()
        from torchvision.models.inception import Inception3
        with torch.random.fork_rng(devices=[]):  # its layers' default init would draw from the caller's stream
            net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        for name, m in net.named_children():
            self.add_module(name, m)
        self.AuxLogits = None  # aux_logits=False: named_children leaves it out

    def forward(self, x):
        """x: (N, 3, H, W) images in [0, 255], uint8 or float (NCHW, any H x W).
        Returns pool3 (N, 2048), spatial (N, 2023), logits (N, 1008) = pool3 @ fc.weight.T without the bias."""
        x = resize_tf1(x.float(), 299)
        x = (x - 128) / 128  # the graph's Sub 128, Mul 1/128: 255 maps to 0.9921875, not to 1
        for m in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                  self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2):
            x = m(x)  # (N, 192, 35, 35) at the end
        for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e',
                     'Mixed_7a', 'Mixed_7b', 'Mixed_7c'):
            m = getattr(self, name)
            if name in ('Mixed_6a', 'Mixed_7a'):  # the grid reductions need no patch
                x = m(x)
                continue
            x, b1 = _tf_mixed(m, x, pool='max' if name == 'Mixed_7c' else 'avg')
            if name == 'Mixed_6d':
                spatial = spatial_features(b1)  # TF 'mixed_6/conv': mixed_6 is Mixed_6d (mixed = 5b)
        pool = self.avgpool(x).flatten(1)  # (N, 2048, 8, 8) -> (N, 2048), TF pool_3
        return pool, spatial, pool @ self.fc.weight.T  # IS uses softmax/logits/MatMul, before the bias


def find_inception(path=None):
    """The weights file: `path` (--inception), then $IREPA_INCEPTION, then torch hub's checkpoints folder."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    where = f'Download {INCEPTION_URL} and pass --inception PATH, set IREPA_INCEPTION=PATH, or put it in {hub}/'
    for p, what in ((path, '--inception'), (os.environ.get('IREPA_INCEPTION'), 'IREPA_INCEPTION')):
        if p:
            if not os.path.isfile(p):
                raise LoadError(f'{what}={p}: no such file; it should be {INCEPTION_FILE}. {where}')
            return p
    for name in (INCEPTION_FILE, INCEPTION_ALT_FILE):
        if os.path.isfile(os.path.join(hub, name)):
            return os.path.join(hub, name)
    raise LoadError(f'FID Inception weights {INCEPTION_FILE} not found (nothing is downloaded). {where}')


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def random_inception(seed=0):
    """An FIDInception with random weights that keep activations O(1) through its 94 layers (He-scaled convs,
    non-trivial BatchNorm statistics; PyTorch's default init shrinks them to 1e-8): for tests and offline smoke runs."""
    net = FIDInception()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
        net.fc.weight.copy_(0.02 * torch.randn(net.fc.weight.shape, generator=g))
        net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=g))  # must not reach the logits
    return net


def load_inception(path=None, any_weights=False, device='cpu'):
    """FIDInception with the 2015-12-05 weights, in eval mode (BN uses its stored statistics), frozen.
    path 'random': random weights (random_inception) for smoke runs without the file, said loudly."""
    if path == 'random':
        print(f'\n{"!" * 100}\nWARNING: the FID Inception has RANDOM weights (--inception random): FID, sFID, IS, '
              f'precision and recall are NOT comparable to anything; this only exercises the pipeline.\n{"!" * 100}\n',
              file=sys.stderr)
        net = random_inception()
        net.weights_sha256 = 'random-0'
        return net.eval().requires_grad_(False).to(device)
    path = find_inception(path)
    digest = sha256_file(path)
    if not digest.startswith(INCEPTION_SHA256):
        if not any_weights:
            raise LoadError(f'{path}: SHA-256 starts with {digest[:8]}, not {INCEPTION_SHA256}: not {INCEPTION_FILE} '
                            f'({INCEPTION_URL}). --any-weights uses it anyway')
        print(f'\n{"!" * 100}\nWARNING: FID Inception weights {path} are NOT {INCEPTION_FILE} (SHA-256 {digest[:8]}).\n'
              f'FID, sFID, IS, precision and recall are NOT comparable to published numbers.\n{"!" * 100}\n',
              file=sys.stderr)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a pickle with code in it, an .npz, a truncated download
        raise LoadError(f'{path}: not a PyTorch state dict ({type(e).__name__}: {str(e)[:200]})') from None
    net = FIDInception()
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]  # not in every converted file
    if missing or unexpected:
        raise LoadError(f'{path}: not an FID Inception state dict (missing {missing[:5]}, unexpected '
                        f'{unexpected[:5]}, {len(missing) + len(unexpected)} in all)')
    net.weights_sha256 = digest  # keys the reference-feature cache
    return net.eval().requires_grad_(False).to(device)

# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# Command line: python encoders.py --list


def main(argv=None):
    parser = argparse.ArgumentParser(prog='encoders.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('--list', action='store_true', help='one row per teacher (built on the meta device)')
    parser.add_argument('--grid', type=int, default=16, help='SiT token grid side used for the input size column')
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return
    aliases = {n: [a for a, c in ALIASES.items() if c == n] for n in TEACHERS}
    print(f"{'teacher':31s} {'timm model':44s} {'input':>5s} {'patch':>5s} {'dim':>5s} {'prefix':>6s} "
          f"{'tokens':>6s} {'params':>8s}  aliases")
    for name, t in TEACHERS.items():
        grid = args.grid if args.grid in t.get('grids', (args.grid,)) else t['grids'][0]
        with torch.device('meta'):
            teacher = Teacher(name, build_model(name, grid), grid, t['norm'])
            tokens = teacher(torch.empty(1, 3, 16 * grid, 16 * grid)).shape[1]  # what the SiT grid gets
        params = sum(p.numel() for p in teacher.model.parameters())
        print(f"{name:31s} {t['timm']:44s} {teacher.input_size:5d} {t['patch']:5d} {t['dim']:5d} {t['prefix']:6d} "
              f"{tokens:6d} {params / 1e6:7.1f}M  {' '.join(aliases[name])}")

if __name__ == '__main__':
    main()
