"""Image grids of what the server generates, for checking a run by eye."""
import math
import os


def save_figure(fig, path, dpi):
    """Writes a matplotlib figure atomically (a reader never sees a half-written .png) and closes it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def save_image_grid(path, images, captions, title=""):
    """images: [N, C, H, W] normalized to [-1, 1]; one captioned cell each, under `title`. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(images)
    cols = min(10, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.35 * rows + (0.3 if title else 0)), squeeze=False)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < count:
            ax.imshow(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i],
                      cmap="gray" if pixels.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_title(captions[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
