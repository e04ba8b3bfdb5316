"""udi.model against the reference's token rules (UDI_SPEC §4): a learned position embedding per class token, the
reference's (DINO's) position-embedding resampling, flooring of crops that are not a multiple of the patch size, and
checkpoints of the reference's layout converting and loading strictly both ways. The expected values come from an
independent float64 implementation (numpy) of the reference's rules, never from the code under test."""
import numpy as np
import pytest
import torch

from udi.model import (DINOHead, UDIModel, ViTBackbone, from_reference_state_dict,
                       reference_pos_embed_interpolation, to_reference_state_dict)

C, HEADS, PATCH, IMG, HIDDEN, BOTTLENECK, K = 32, 2, 16, 224, 24, 8, 40
BASE_GRID = IMG // PATCH  # 14: pos_embed [1, 2 + 196, C], as the reference's ViT-S/16


def cubic_weights(t, A=-0.75):
    """Keys' cubic convolution (PyTorch's bicubic, A = -0.75) for taps at offsets -1, 0, 1, 2 of a fraction t."""
    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(n_in, n_out, scale):
    """[n_out, n_in] float64: interpolate(mode="bicubic", align_corners=False) along one axis with the scale factor
    used as given: source x = (i + 0.5) / scale - 0.5, taps clamped to the border."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(x))
        for offset, w in zip((-1, 0, 1, 2), cubic_weights(x - x0)):
            matrix[i, min(max(x0 + offset, 0), n_in - 1)] += w
    return matrix


def expected_pos_embed(pos_embed, rows, cols):
    """The reference's interpolate_pos_encoding in numpy float64: [1, 2 + n*n, C] -> [1, 2 + rows*cols, C]."""
    pos = pos_embed.detach().double().numpy()[0]
    n = BASE_GRID
    if (rows, cols) == (n, n):
        return pos
    grid = pos[2:].reshape(n, n, -1)
    resampled = np.einsum("rn,nmc,km->rkc", bicubic_matrix(n, rows, (rows + 0.1) / n), grid,
                          bicubic_matrix(n, cols, (cols + 0.1) / n))
    return np.concatenate([pos[:2], resampled.reshape(rows * cols, -1)])


def expected_tokens(state, images):
    """The reference's prepare_tokens in numpy float64: the patch conv (stride = patch, remainder ignored),
    [cls, cls+] prepended, position embeddings added."""
    x = images.double().numpy()
    rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH
    patches = x[..., :rows * PATCH, :cols * PATCH].reshape(x.shape[0], 3, rows, PATCH, cols, PATCH)
    weight = state["backbone.backbone.patch_embed.proj.weight"].double().numpy()
    embedded = np.einsum("bcrpkq,ocpq->brko", patches, weight).reshape(x.shape[0], rows * cols, C)
    embedded = embedded + state["backbone.backbone.patch_embed.proj.bias"].double().numpy()
    cls = np.broadcast_to(state["backbone.backbone.cls_token"].double().numpy(), (x.shape[0], 2, C))
    return np.concatenate([cls, embedded], 1) + expected_pos_embed(state["backbone.backbone.pos_embed"], rows, cols)


def reference_layout(seed=0, prefix="module."):
    """A random state dict of the reference's MultiCropWrapper (main_udi.py): a one-block ViT with two class tokens
    inside UDIWrapper with MaskedAttention, and the one DINO head shared by cls, cls+ and patch (head.0-2)."""
    gen = torch.Generator().manual_seed(seed)
    vit = {"cls_token": (1, 2, C), "pos_embed": (1, 2 + BASE_GRID ** 2, C),
           "patch_embed.proj.weight": (C, 3, PATCH, PATCH), "patch_embed.proj.bias": (C,),
           "blocks.0.norm1.weight": (C,), "blocks.0.norm1.bias": (C,), "blocks.0.attn.qkv.weight": (3 * C, C),
           "blocks.0.attn.qkv.bias": (3 * C,), "blocks.0.attn.proj.weight": (C, C), "blocks.0.attn.proj.bias": (C,),
           "blocks.0.norm2.weight": (C,), "blocks.0.norm2.bias": (C,), "blocks.0.mlp.fc1.weight": (4 * C, C),
           "blocks.0.mlp.fc1.bias": (4 * C,), "blocks.0.mlp.fc2.weight": (C, 4 * C), "blocks.0.mlp.fc2.bias": (C,),
           "norm.weight": (C,), "norm.bias": (C,)}
    wrapper = {"attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,), "attn.proj.weight": (C, C),
               "attn.proj.bias": (C,), "attn.norm.weight": (C,), "attn.norm.bias": (C,), "norm1.weight": (C,),
               "norm1.bias": (C,)}
    head = {"mlp.0.weight": (HIDDEN, C), "mlp.0.bias": (HIDDEN,), "mlp.2.weight": (HIDDEN, HIDDEN),
            "mlp.2.bias": (HIDDEN,), "mlp.4.weight": (BOTTLENECK, HIDDEN), "mlp.4.bias": (BOTTLENECK,),
            "last_layer.weight_g": (K, 1), "last_layer.weight_v": (K, BOTTLENECK)}
    state = {}
    for scope, shapes in (("backbone.backbone.", vit), ("backbone.", wrapper)):
        state.update({prefix + scope + k: 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()})
    shared = {k: 0.1 * torch.randn(s, generator=gen) for k, s in head.items()}
    state.update({f"{prefix}head.{i}.{k}": v for i in range(3) for k, v in shared.items()})
    return state


def our_model(resampling="reference", seed=1):
    torch.manual_seed(seed)
    backbone = ViTBackbone("vit_tiny", PATCH, IMG, 0.0, resampling, embed_dim=C, depth=1, num_heads=HEADS)
    return UDIModel(backbone, DINOHead(C, K, norm_last_layer=False, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK))


def test_pos_embed_interpolation_is_the_reference_rule():
    """Down- and up-sampling, square and not: against the float64 numpy rule (only rounding separates them)."""
    pos = torch.randn(1, 2 + BASE_GRID ** 2, C, dtype=torch.float64)
    for rows, cols in ((6, 6), (4, 9), (20, 17), (1, 3)):
        got = reference_pos_embed_interpolation(pos[:, 2:], rows, cols)
        np.testing.assert_allclose(got[0].numpy(), expected_pos_embed(pos, rows, cols)[2:], rtol=0, atol=1e-12)


def test_converted_reference_checkpoint_gives_the_reference_tokens_at_96_px():
    reference = reference_layout()
    model = our_model().double()
    model.load_state_dict({k: v.double() for k, v in from_reference_state_dict(reference).items()})  # strict
    state = {k[len("module."):]: v for k, v in reference.items()}
    for height, width in ((96, 96), (224, 224), (100, 70), (96, 64)):
        images = torch.randn(2, 3, height, width, dtype=torch.float64)
        tokens = model.backbone.tokens(images)
        np.testing.assert_allclose(tokens.detach().numpy(), expected_tokens(state, images), rtol=0, atol=1e-10,
                                   err_msg=f"{height}x{width}")
    # each class token has its own position embedding
    pos, cls = state["backbone.backbone.pos_embed"], state["backbone.backbone.cls_token"]
    torch.testing.assert_close(model.backbone.tokens(torch.randn(1, 3, 96, 96).double())[0, :2],
                               (cls.double() + pos[:, :2].double())[0], rtol=0, atol=0)


def test_timm_resampling_is_behind_the_flag():
    reference = from_reference_state_dict(reference_layout())
    by_rule, by_timm = our_model(), our_model("timm")
    by_rule.load_state_dict(reference)
    by_timm.load_state_dict(reference)
    images = torch.randn(2, 3, 96, 96)
    assert not torch.allclose(by_rule.backbone.tokens(images), by_timm.backbone.tokens(images), atol=1e-3)
    images = torch.randn(2, 3, IMG, IMG)  # the model's own grid: no resampling either way
    assert torch.equal(by_rule.backbone.tokens(images), by_timm.backbone.tokens(images))
    with pytest.raises(ValueError, match="pos_embed_resampling"):
        our_model("antialiased")


def test_reference_checkpoints_convert_and_load_strictly_both_ways():
    for prefix in ("module.", ""):  # a DDP student, a teacher
        reference = reference_layout(prefix=prefix)
        model = our_model()
        model.load_state_dict(from_reference_state_dict(reference))  # strict: no missing, no unexpected key
        back = to_reference_state_dict(model.state_dict())
        assert set(back) == {k[len(prefix):] for k in reference}
        assert all(torch.equal(back[k[len(prefix):]], v) for k, v in reference.items())


def test_reference_conversion_refuses_what_it_cannot_represent():
    reference = reference_layout()
    decoupled = dict(reference, **{"module.head.2.mlp.0.bias": torch.zeros(HIDDEN)})
    with pytest.raises(ValueError, match="heads differ in 'mlp.0.bias'"):
        from_reference_state_dict(decoupled)
    with pytest.raises(ValueError, match="unexpected key 'backbone.fc.weight'"):
        from_reference_state_dict(dict(reference, **{"module.backbone.fc.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        to_reference_state_dict(dict(our_model().state_dict(), **{"extra.weight": torch.zeros(1)}))


def test_crops_are_floored_to_the_patch_grid_as_dino_does():
    model = our_model().eval()
    images = torch.randn(2, 3, 100, 83)
    with torch.no_grad():
        floored, cropped = model.backbone(images), model.backbone(images[..., :96, :80])
    assert floored.patch.shape == (2, 6 * 5, C)
    for a, b in zip(floored, cropped):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"12x40 px are smaller than one patch \(patch_size 16\)"):
        model.backbone(torch.randn(1, 3, 12, 40))


def test_one_class_token_has_dino_vits_parameters_and_tokens():
    """--objective dino: cls_token [1, 1, C] and pos_embed [1, 1 + N, C] as DINO's ViT, resampled by the same rule."""
    torch.manual_seed(2)
    backbone = ViTBackbone("vit_tiny", PATCH, IMG, 0.0, class_tokens=1, embed_dim=C, depth=1, num_heads=HEADS)
    assert backbone.cls_token.shape == (1, 1, C) and backbone.pos_embed.shape == (1, 1 + BASE_GRID ** 2, C)
    backbone = backbone.double()
    images = torch.randn(2, 3, 96, 80, dtype=torch.float64)
    pos = backbone.pos_embed.detach().double()
    two_token_layout = torch.cat([pos[:, :1], pos], 1)  # expected_pos_embed reads the patches after two entries
    expected_pos = expected_pos_embed(two_token_layout, 6, 5)[1:]
    x = images.numpy()
    patches = x.reshape(2, 3, 6, PATCH, 5, PATCH)
    weight = backbone.vit.patch_embed.proj.weight.detach().numpy()
    embedded = np.einsum("bcrpkq,ocpq->brko", patches, weight).reshape(2, 30, C)
    embedded = embedded + backbone.vit.patch_embed.proj.bias.detach().numpy()
    cls = np.broadcast_to(backbone.cls_token.detach().numpy(), (2, 1, C))
    np.testing.assert_allclose(backbone.tokens(images).detach().numpy(),
                               np.concatenate([cls, embedded], 1) + expected_pos, rtol=0, atol=1e-10)
    out = backbone(images)
    assert out.cls_plus is None and out.cls.shape == (2, C) and out.patch.shape == (2, 30, C)
    with pytest.raises(ValueError, match="class_tokens must be 1"):
        ViTBackbone("vit_tiny", PATCH, IMG, class_tokens=3, embed_dim=C, depth=1, num_heads=HEADS)


def saved_bytes_and_grads(backbone, images):
    """The bytes autograd keeps for the backward of the backbone's outputs, and the parameters' gradients."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    torch.manual_seed(7)  # stochastic depth draws in the blocks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone(images)
    (out.cls.square().sum() + out.cls_plus.sum() + out.patch.square().mean()).backward()
    return sum(saved), {name: p.grad.clone() for name, p in backbone.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients_bit_for_bit_and_keeps_less():
    """--grad_checkpointing (issue 23 §2): each block recomputed in the backward, stochastic depth included."""
    torch.manual_seed(3)
    backbone = ViTBackbone("vit_tiny", PATCH, IMG, 0.3, embed_dim=C, depth=3, num_heads=HEADS)
    images = torch.randn(4, 3, 64, 48)
    kept, grads = saved_bytes_and_grads(backbone, images)
    backbone.zero_grad(set_to_none=True)
    backbone.grad_checkpointing = True
    kept_checkpointed, grads_checkpointed = saved_bytes_and_grads(backbone, images)
    assert grads.keys() == grads_checkpointed.keys()
    assert all(torch.equal(grads[name], grads_checkpointed[name]) for name in grads)
    assert kept_checkpointed < kept / 2
