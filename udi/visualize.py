"""Attention maps of the last block, from cls and from cls+, one panel per head (the paper's visualisation):
`python -m udi.visualize --pretrained_weights out/checkpoint.pth [--image_path a.jpg ...] --output_dir maps`."""
import argparse
import os

import matplotlib
import torch

from .data import IMAGENET_MEAN, IMAGENET_STD, eval_transform

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def _embedded_picture(name):
    import skimage.data
    return getattr(skimage.data, name)()


def attention_grids(backbone, image, patch_size):
    """image [3, H, W] -> attention of cls and of cls+ to the patches, [2, heads, H/p, W/p]."""
    attn = backbone.last_attention(image[None])[0]
    grid = (image.shape[-2] // patch_size, image.shape[-1] // patch_size)
    return attn[:, :2, 2:].transpose(0, 1).reshape(2, attn.shape[0], *grid).float().cpu()


def plot_attention(image, grids, path):
    heads = grids.shape[1]
    fig, axes = plt.subplots(2, heads + 1, figsize=(2 * (heads + 1), 4.2), squeeze=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    picture = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)
    for row, token in enumerate(("cls", "cls+")):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(token)
        for h in range(heads):
            axes[row, h + 1].imshow(grids[row, h], cmap="inferno")
            axes[row, h + 1].set_title(f"{token} head {h}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_attention_maps(backbone, output_dir, image_size, device, pictures=None):
    """Write one PNG per picture (default: a few embedded sample images); returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    pictures = pictures or {name: _embedded_picture(name) for name in DEFAULT_IMAGES}
    transform, paths = eval_transform(image_size), []
    backbone.eval()
    for name, picture in pictures.items():
        image = transform(picture).to(device)
        path = os.path.join(output_dir, f"attention_{name}.png")
        plot_attention(image, attention_grids(backbone, image, backbone.patch_size), path)
        paths.append(path)
    return paths


def main(argv=None):
    from PIL import Image

    from .eval_knn import load_backbone
    p = argparse.ArgumentParser("UDI attention maps")
    p.add_argument("--pretrained_weights", required=True)
    p.add_argument("--checkpoint_key", default="teacher")
    p.add_argument("--image_path", nargs="*", default=None, help="default: embedded sample images")
    p.add_argument("--image_size", default=None, type=int)
    p.add_argument("--output_dir", default="attention")
    args = p.parse_args(argv)
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    pictures = {os.path.splitext(os.path.basename(f))[0]: Image.open(f).convert("RGB")
                for f in args.image_path} if args.image_path else None
    paths = save_attention_maps(backbone, args.output_dir, args.image_size or train_args.global_crop_size,
                                torch.device("cpu"), pictures)
    print("\n".join(paths))


if __name__ == "__main__":
    main()
