"""The UDI network: a timm ViT with a cls+ token, the SRS-attention head path and one shared DINO head.

Token layout and parameters as in the reference's vision_transformer.py (UDI_SPEC §4): tokens `[cls, cls+, patches]`,
`cls_token [1, 2, C]` and `pos_embed [1, 2 + N, C]`, a learned position embedding for each class token, then one per
patch of the `img_size / patch_size` grid. The timm ViT supplies the patch embedding, the blocks and the norms
(created without its own class token and position embedding). Crops whose side is not a multiple of the patch size
are floored as DINO's patch embedding (a convolution with stride = patch size) does: the last `side % patch` rows
and columns are not seen. For other grids the patch part of `pos_embed` is resampled: by default the reference's
(DINO's) rule, `reference_pos_embed_interpolation`; `pos_embed_resampling="timm"` uses timm's instead.

Rows, taps and outputs follow udi_kernels.layout (its docstring walks a crop from the data loader to the loss rows):
crop-major batches as in DINO (row `crop * B + b`); the student takes StudentTaps and returns UDIStudent, the teacher
takes TeacherTaps and returns a UDITeacher of bottleneck rows, from which the training step (udi.step) forms the
loss's targets. The network knows no loss.

With `fuse_last_layer` (udi.train's default) the student stops before the head's last layer and hands the loss its
input rows with its effective weight (LastLayerInput), the losses' `weight=` / `teacher_weight=`: the loss forms the
logits K-chunk by K-chunk (udi_kernels.linear_distill_cross_entropy, UDI_SPEC §10) and no [rows, K] tensor exists.
The parameters and the state-dict keys are the same either way.
"""
import math
from typing import Any, NamedTuple, Optional

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from udi_kernels.layout import StudentTaps, TeacherTaps, UDIStudent, UDITeacher, split_teacher_samples, teacher_rows_by_pair
from udi_kernels.nn import SRSAttention

DINO_ARCHS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}
POS_EMBED_RESAMPLING = ("reference", "timm")


class BackboneOutput(NamedTuple):
    cls: Tensor                 # [B, C] after the final norm
    cls_plus: Optional[Tensor]  # [B, C] after the final norm; None for a backbone with one class token (DINO)
    patch: Tensor               # [B, N, C] last block's output, before the final norm

    def class_tokens(self) -> dict:
        """The class tokens the backbone has, by name: {"cls": [B, C], "cls_plus": [B, C]}, cls alone with one."""
        return {name: token for name, token in (("cls", self.cls), ("cls_plus", self.cls_plus)) if token is not None}


def reference_pos_embed_interpolation(patch_pos_embed: Tensor, rows: int, cols: int) -> Tensor:
    """The reference's (and DINO's) resampling of patch position embeddings, vision_transformer.py
    `interpolate_pos_encoding`: [1, n*n, C] (a square grid) -> [1, rows*cols, C], bicubic (PyTorch's cubic
    convolution, A = -0.75), no antialias, align_corners=False, with the scale factor (side + 0.1) / n per axis
    used as given (not recomputed from the sizes): the 0.1 keeps floor(n * scale) = side despite rounding.
    Computed in the embedding's dtype."""
    n = math.isqrt(patch_pos_embed.shape[1])
    if n * n != patch_pos_embed.shape[1]:
        raise ValueError(f"patch_pos_embed must cover a square grid, got {patch_pos_embed.shape[1]} entries")
    grid = patch_pos_embed.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid, scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic")
    return resampled.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)


class ViTBackbone(nn.Module):
    """A ViT with the reference's token parameters (module docstring).

    forward(images [B, 3, H, W]) -> BackboneOutput; H, W >= patch_size (floored to multiples of it).
    pos_embed_resampling: "reference" (DINO's rule, default) or "timm" (timm's antialiased bicubic).
    class_tokens: 2 (cls, cls+: UDI; `cls_token [1, 2, C]`, `pos_embed [1, 2 + N, C]`) or 1 (cls: DINO;
    `cls_token [1, 1, C]`, `pos_embed [1, 1 + N, C]`).
    grad_checkpointing: under autograd, keep only each block's input and recompute the block in the backward
    (torch.utils.checkpoint, non-reentrant, the RNG state restored: the same gradients bit for bit).
    """

    def __init__(self, arch="vit_small", patch_size=16, img_size=224, drop_path_rate=0.1,
                 pos_embed_resampling="reference", class_tokens=2, grad_checkpointing=False, **overrides):
        super().__init__()
        if pos_embed_resampling not in POS_EMBED_RESAMPLING:
            raise ValueError(f"pos_embed_resampling must be one of {POS_EMBED_RESAMPLING}, "
                             f"got {pos_embed_resampling!r}")
        if class_tokens not in (1, 2):
            raise ValueError(f"class_tokens must be 1 (DINO) or 2 (UDI), got {class_tokens}")
        if img_size < patch_size:
            raise ValueError(f"img_size ({img_size}) must be at least patch_size ({patch_size})")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        self.vit = timm.create_model(DINO_ARCHS.get(arch, arch), pretrained=False, img_size=img_size,
                                     patch_size=patch_size, num_classes=0, global_pool="", class_token=False,
                                     pos_embed="none", dynamic_img_size=True, drop_path_rate=drop_path_rate,
                                     **overrides)
        self.embed_dim, self.num_heads = self.vit.embed_dim, self.vit.blocks[0].attn.num_heads
        self.patch_size, self.grid_size, self.class_tokens = patch_size, img_size // patch_size, class_tokens
        self.pos_embed_resampling, self.grad_checkpointing = pos_embed_resampling, grad_checkpointing
        self.cls_token = nn.Parameter(torch.zeros(1, class_tokens, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, class_tokens + self.grid_size ** 2, self.embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """[1, class_tokens + rows*cols, C]: the class tokens' entries, then the patch part resampled to rows x cols."""
        if (rows, cols) == (self.grid_size, self.grid_size):
            return self.pos_embed
        prefix, patch = self.pos_embed[:, :self.class_tokens], self.pos_embed[:, self.class_tokens:]
        if self.pos_embed_resampling == "timm":
            patch = resample_abs_pos_embed(patch, new_size=[rows, cols], old_size=[self.grid_size] * 2,
                                           num_prefix_tokens=0)
        else:
            patch = reference_pos_embed_interpolation(patch, rows, cols)
        return torch.cat([prefix, patch], 1)

    def tokens(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> embedded tokens [B, class_tokens + (H // p) * (W // p), C] before the first
        block."""
        p = self.patch_size
        rows, cols = images.shape[-2] // p, images.shape[-1] // p
        if rows == 0 or cols == 0:
            raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} px are smaller than one patch "
                             f"(patch_size {p})")
        x = self.vit.patch_embed(images[..., :rows * p, :cols * p]).flatten(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.position_embedding(rows, cols)
        return self.vit.norm_pre(self.vit.pos_drop(x))

    def blocks(self, x: Tensor) -> Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.vit.blocks(x)
        for block in self.vit.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward(self, images: Tensor) -> BackboneOutput:
        x = self.blocks(self.tokens(images))
        k = self.class_tokens
        prefix = self.vit.norm(x[:, :k])
        return BackboneOutput(prefix[:, 0], prefix[:, 1] if k == 2 else None, x[:, k:])

    @torch.no_grad()
    def last_attention(self, images: Tensor) -> Tensor:
        """Attention probabilities of the last block, [B, H, class_tokens + N, class_tokens + N]."""
        x = self.tokens(images)
        for block in self.vit.blocks[:-1]:
            x = block(x)
        attn = self.vit.blocks[-1].attn
        B, N, C = x.shape
        qkv = attn.qkv(self.vit.blocks[-1].norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = weight_g * weight_v / ||weight_v|| per output row (DINO's last layer)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        trunc_normal_(self.weight_v, std=0.02)

    @property
    def weight(self) -> Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight)


class DINOHead(nn.Module):
    """MLP C -> hidden -> hidden -> bottleneck (GELU), L2-normalise, weight-normalised Linear(bottleneck -> K).

    use_bn (DINO's and the reference's --use_bn_in_head): a BatchNorm1d after each hidden Linear, at the reference's
    indices (`mlp.1`, `mlp.4`). It normalises over all rows of one call, whatever the leading dims ([..., C] ->
    [..., K]): the student's one call over all its rows (as DINO's one head call over all crops), the teacher's
    cls rows and its sample rows separately; the teacher, in train mode as in DINO, uses its batch's statistics.
    """

    def __init__(self, in_dim, out_dim, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256, use_bn=False):
        super().__init__()
        layers = []
        for width_in in (in_dim, hidden_dim):
            layers += [nn.Linear(width_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def bottleneck(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))


class LastLayerInput(NamedTuple):
    """What a network with fuse_last_layer hands the loss instead of logits: the rows its head's last layer would
    take (bottleneck vectors [.., D], in the network's usual container: UDIStudent, UDITargets or a Tensor) and the
    last layer's effective weight [K, D] (after weight norm, in the autograd graph of weight_g and weight_v for the
    student), the losses' `weight=` (student) / `teacher_weight=` (teacher)."""
    rows: Any
    weight: Tensor


def split_last_layer(output):
    """A network's output -> (rows, last-layer weight): a LastLayerInput's fields, or (logits, None)."""
    return tuple(output) if isinstance(output, LastLayerInput) else (output, None)


class UDIModel(nn.Module):
    """Backbone (two class tokens) + SRS attention (`srs`) + the shared DINO head. `forward` is the student's whole
    computation, `teacher_bottleneck` the teacher's. fuse_last_layer: forward returns LastLayerInput (bottleneck rows
    and the last layer's weight) instead of logits."""
    class_tokens = 2

    def __init__(self, backbone: ViTBackbone, head: DINOHead, fuse_last_layer: bool = False):
        super().__init__()
        self.backbone, self.head, self.fuse_last_layer = backbone, head, fuse_last_layer
        self.srs = SRSAttention(backbone.embed_dim, backbone.num_heads)

    def forward(self, global_crops: Tensor, local_crops: Optional[Tensor], taps: StudentTaps):
        """global_crops [2B, 3, Hg, Wg], local_crops [LB, 3, Hl, Wl] or None (layout.stack_crops),
        taps: layout.student_taps of the batch's SampledPairs -> UDIStudent of logits [.., K], or with
        fuse_last_layer LastLayerInput(UDIStudent of bottleneck rows [.., D], weight [K, D])."""
        outputs = [self.backbone(global_crops)]
        if local_crops is not None:
            outputs.append(self.backbone(local_crops))
        samples = self.srs(outputs[0].patch, taps.index, taps.weight)
        cls = torch.cat([o.cls for o in outputs])
        rows = torch.cat([cls, torch.cat([o.cls_plus for o in outputs]), samples.flatten(0, 1)])
        head = self.head.bottleneck if self.fuse_last_layer else self.head
        cls, cls_plus, patch = head(rows).split([len(cls), len(cls), samples.shape[0] * samples.shape[1]])
        return self._hand_over(UDIStudent(cls, cls_plus, patch.unflatten(0, samples.shape[:2])))

    @torch.no_grad()
    def teacher_bottleneck(self, global_crops: Tensor, taps: TeacherTaps) -> UDITeacher:
        """global_crops [2B, 3, Hg, Wg], taps: layout.teacher_taps of the batch's SampledPairs -> UDITeacher of the
        head's bottleneck rows [.., D] (cls, and the samples by crop pair), where UDI's targets are formed (UDI_SPEC
        §6) before the last layer (`head.last_layer`) takes them to K. One backbone pass over the global crops, one
        SRS pass per crop for all its sample sets."""
        out = self.backbone(global_crops)
        z = self.head.bottleneck(self.srs(teacher_rows_by_pair(out.patch), taps.index, taps.weight))
        return UDITeacher(self.head.bottleneck(out.cls), *split_teacher_samples(z, taps))

    def _hand_over(self, rows):
        return LastLayerInput(rows, self.head.last_layer.weight) if self.fuse_last_layer else rows


class DINOModel(nn.Module):
    """DINO's network on the same backbone, with one class token: backbone + DINO head on cls (no SRS head).
    fuse_last_layer: forward and teacher_targets return LastLayerInput instead of logits."""
    class_tokens = 1

    def __init__(self, backbone: ViTBackbone, head: DINOHead, fuse_last_layer: bool = False):
        super().__init__()
        self.backbone, self.head, self.fuse_last_layer = backbone, head, fuse_last_layer

    def forward(self, global_crops: Tensor, local_crops):
        """global_crops [2B, 3, Hg, Wg], local_crops [LB, 3, Hl, Wl] or None -> logits [(2 + L)B, K] crop-major,
        or with fuse_last_layer LastLayerInput(bottleneck rows [(2 + L)B, D], weight [K, D])."""
        cls = [self.backbone(global_crops).cls]
        if local_crops is not None:
            cls.append(self.backbone(local_crops).cls)
        return self._head(torch.cat(cls))

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor):
        """-> the teacher's cls logits [2B, K], crop-major (with fuse_last_layer: LastLayerInput as forward's)."""
        return self._head(self.backbone(global_crops).cls)

    def _head(self, cls: Tensor):
        if self.fuse_last_layer:
            return LastLayerInput(self.head.bottleneck(cls), self.head.last_layer.weight)
        return self.head(cls)


NETWORKS = {"udi": UDIModel, "dino": DINOModel}  # the network each --objective trains


def build_model(args, teacher: bool = False):
    """The network of `args.objective` (NETWORKS; default "udi"), as udi.train's flags describe it: the student
    (stochastic depth at --drop_path_rate) or, with teacher=True, the teacher: no stochastic layer, so its targets
    are a deterministic function of the input (as in DINO, iBOT and the reference). `args.fuse_last_layer` (default
    True, udi.train's) -> the network's fuse_last_layer."""
    network = NETWORKS[getattr(args, "objective", "udi")]
    backbone = ViTBackbone(args.arch, args.patch_size, args.global_crop_size, 0.0 if teacher else args.drop_path_rate,
                           args.pos_embed_resampling, class_tokens=network.class_tokens,
                           grad_checkpointing=getattr(args, "grad_checkpointing", False), embed_dim=args.embed_dim,
                           depth=args.depth, num_heads=args.num_heads)
    head = DINOHead(backbone.embed_dim, args.out_dim, args.norm_last_layer, args.head_hidden_dim,
                    args.head_bottleneck_dim, use_bn=getattr(args, "use_bn_in_head", False))
    return network(backbone, head, getattr(args, "fuse_last_layer", True))


# ---- the reference's checkpoints --------------------------------------------------------------------------
# The reference saves its MultiCropWrapper (main_udi.py): `backbone` is a UDIWrapper around the ViT
# (`backbone.backbone.*`, with `cls_token [1, 2, C]` and `pos_embed [1, 2 + N, C]` as ours) holding the SRS-attention
# parameters (`backbone.norm1.*`, `backbone.attn.{qkv,proj,norm}.*`); `head` is a ModuleList of the one shared DINO
# head, once per output (cls, cls+, patch): `head.{0,1,2}.*`. A DDP student carries a `module.` prefix.
REFERENCE_HEADS = 3
_REFERENCE_PREFIXES = (("backbone.backbone.cls_token", "backbone.cls_token"),
                       ("backbone.backbone.pos_embed", "backbone.pos_embed"), ("backbone.backbone.", "backbone.vit."),
                       ("backbone.norm1.", "srs.norm1."), ("backbone.attn.", "srs.attn."))


def _rename(key: str, prefixes, what: str) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    raise ValueError(f"unexpected key {key!r} in {what}")


def from_reference_state_dict(state: dict) -> dict:
    """A state dict of the reference's MultiCropWrapper (student or teacher; `module.` prefixes dropped) -> one
    that UDIModel loads strictly. Raises ValueError for keys it does not know and for heads that differ (the
    reference's decouple_head=True: this model shares one head)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    converted, heads = {}, {}
    for key, value in state.items():
        if key.startswith("head."):
            _, name = key[len("head."):].split(".", 1)
            heads.setdefault(name, []).append(value)
            continue
        converted[_rename(key, _REFERENCE_PREFIXES, "a reference UDI state dict")] = value
    for name, copies in heads.items():
        if any(not torch.equal(c, copies[0]) for c in copies[1:]):
            raise ValueError(f"the reference checkpoint's heads differ in {name!r} (decouple_head=True?); "
                             "UDIModel has one shared head")
        converted["head." + name] = copies[0]
    return converted


def to_reference_state_dict(state: dict) -> dict:
    """UDIModel's state dict -> the reference's MultiCropWrapper layout (no `module.` prefix), loading strictly
    into `MultiCropWrapper(UDIWrapper(vit, MaskedAttention), DINOHead)` with cls+ and the patch output."""
    inverse = [(new, old) for old, new in _REFERENCE_PREFIXES]
    converted = {}
    for key, value in state.items():
        if key.startswith("head."):
            for index in range(REFERENCE_HEADS):
                converted[f"head.{index}.{key[len('head.'):]}"] = value
        else:
            converted[_rename(key, inverse, "a UDIModel state dict")] = value
    return converted


def convert_reference_checkpoint(checkpoint: dict) -> dict:
    """A reference training checkpoint -> ours (student and teacher converted; other entries kept)."""
    converted = dict(checkpoint)
    for name in ("student", "teacher"):
        if name in checkpoint:
            converted[name] = from_reference_state_dict(checkpoint[name])
    return converted
