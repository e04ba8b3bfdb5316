"""Attention maps of the last block, from cls and from cls+ to the patches, one panel per head with its colour bar,
for a trained network and, beside it, a randomly initialised one (the paper's visualisation):
`python -m udi.visualize --pretrained_weights out/checkpoint.pth [--image_path a.jpg ...] --output_dir maps`.

Default pictures: held-out images of the embedded labelled data the checkpoint trained on (udi.digits or
udi.scenes; --embedded_data), shown with their per-pixel classes.
"""
import os

import matplotlib
import torch

from .data import IMAGENET_MEAN, IMAGENET_STD, LABELLED_DATA, class_names, eval_transform, labelled_images, normalize
from .data.folders import read_image
from .evaluation import TOKEN_NAMES, checkpoint_parser, evaluation_data, load_backbone, parse_checkpoint_args, run_main
from .flags import SEED, existing_file, int_in, output_folder
from .model import build_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

def attention_grids(backbone, image):
    """image [3, H, W] -> attention of each class token to the patches, [class_tokens, heads, H/p, W/p]."""
    attn = backbone.last_attention(image[None])[0]
    k = backbone.class_tokens
    grid = (image.shape[-2] // backbone.patch_size, image.shape[-1] // backbone.patch_size)
    return attn[:, :k, k:].transpose(0, 1).reshape(k, attn.shape[0], *grid).float().cpu()


def _picture(image):
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def plot_attention(image, networks: dict, path, pixel_labels=None):
    """One row per (network, class token), one column per head; `networks` maps a name to its attention grids
    [class_tokens, heads, h, w]. The first column shows the picture (and below it the pixel classes, if given)."""
    rows = [(name, t) for name, grids in networks.items() for t in range(grids.shape[0])]
    heads = next(iter(networks.values())).shape[1]
    fig, axes = plt.subplots(len(rows), heads + 1, figsize=(2.4 * heads + 2, 2.1 * len(rows)), squeeze=False,
                             subplot_kw=dict(xticks=[], yticks=[]))
    firsts = [_picture(image)] + ([pixel_labels] if pixel_labels is not None else [])
    for r, (name, token) in enumerate(rows):
        first = firsts[r % len(firsts)]
        axes[r, 0].imshow(first, **({} if first.ndim == 3 else dict(cmap="tab20", vmin=0, vmax=19,
                                                                      interpolation="nearest")))
        axes[r, 0].set_title("image" if first.ndim == 3 else "pixel classes", fontsize=8)
        for h in range(heads):
            panel = axes[r, h + 1].imshow(networks[name][token, h], cmap="inferno", interpolation="nearest")
            axes[r, h + 1].set_title(f"{name}: {list(TOKEN_NAMES.values())[token]}, head {h}", fontsize=8)
            fig.colorbar(panel, ax=axes[r, h + 1], fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def held_out_images(data: str, count: int, image_size: int) -> dict:
    """The first `count` held-out images of the embedded labelled data `data`: name -> (normalised image [3, s, s],
    pixel classes [s, s])."""
    images, labels, pixels = labelled_images(data, count, image_size, "val")
    names = class_names(data)
    return {f"{data}{i}_{names[labels[i]]}": (normalize(images[i]), pixels[i]) for i in range(count)}


def save_attention_maps(backbones: dict, output_dir, pictures: dict, device):
    """backbones: name -> backbone (e.g. trained, random init); pictures: name -> (normalised image, pixel classes
    or None). Writes one PNG per picture; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for backbone in backbones.values():
        backbone.eval()
    for name, (image, pixel_labels) in pictures.items():
        grids = {net: attention_grids(backbone, image.to(device)) for net, backbone in backbones.items()}
        path = os.path.join(output_dir, f"attention_{name}.png")
        plot_attention(image, grids, path, pixel_labels)
        paths.append(path)
    return paths


def visualize_parser():
    p = checkpoint_parser("UDI attention maps", data_path=False)
    p.add_argument("--image_path", nargs="*", default=None, type=existing_file,
                   help="pictures; default: held-out images of --embedded_data")
    p.add_argument("--num_images", default=4, type=int_in(1, max(held for _, held in LABELLED_DATA.values())),
                   help="how many held-out images without --image_path (at most the data's held-out images)")
    p.add_argument("--output_dir", default="attention", type=output_folder, help="where the PNGs go")
    p.add_argument("--seed", default=1, type=SEED, help="seed of the randomly initialised network shown beside")
    return p


def main(argv=None):
    p = visualize_parser()
    args = parse_checkpoint_args(p, argv)
    backbone, train_args = load_backbone(args.pretrained_weights, args.checkpoint_key)
    data, size = evaluation_data(args, train_args), args.image_size or train_args.global_crop_size
    if not args.image_path and args.num_images > LABELLED_DATA[data][1]:
        p.error(f"--num_images {args.num_images}: the embedded {data} hold {LABELLED_DATA[data][1]} held-out images")
    torch.manual_seed(args.seed)
    backbones = {"trained": backbone, "random init": build_model(train_args).backbone}
    if args.image_path:
        transform = eval_transform(size)
        pictures = {os.path.splitext(os.path.basename(f))[0]: (transform(read_image(f)), None)
                    for f in args.image_path}
    else:
        pictures = held_out_images(data, args.num_images, size)
    paths = save_attention_maps(backbones, args.output_dir, pictures, torch.device("cpu"))
    print("\n".join(paths))


if __name__ == "__main__":
    run_main(main)
