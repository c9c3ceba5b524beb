"""Views of the same images from the old per-sample MONAI path and the new on-device path, side by side.

Usage (from the repository root; the old path lives in a checkout of a commit before it was removed)::

    git worktree add --detach /tmp/medssl-old 7221a76
    .venv/bin/python benchmarks/views_old_new.py --old-tree /tmp/medssl-old --update BENCHMARKS.md

Four images (two Kermany chest X-rays, two hippocampus MR slices from ../shared/data, each scaled to [0, 1] and to
at most 128 px a side, as the quality benchmark's cache) get the default multi-crop views (2 x 96 px + 4 x 48 px)
from both paths: a picture of one draw each, and pixel statistics over ``--draws`` draws per image (mean, standard
deviation, share of exact zeros: the corners that the rotation / zoom-out leaves empty, mean absolute horizontal
gradient: sharpness, which blur lowers). The old path runs in a subprocess with the old checkout first on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "benchmarks" / "figures" / "views-old-new.png"

OLD_VIEWS = """
import sys, numpy as np, torch
from medssl.data.views import MultiCrop, MultiCropConfig
images = np.load(sys.argv[1], allow_pickle=True)
draws = int(sys.argv[3])
multicrop = MultiCrop(MultiCropConfig())
out = {}
for i, image in enumerate(images):
    for d in range(draws):
        views = multicrop(torch.from_numpy(image), np.random.default_rng([0, d, i]))
        for v, view in enumerate(views):
            out[f"{i}_{d}_{v}"] = view.numpy()
np.savez(sys.argv[2], **out)
"""


def load_images(data: Path) -> list[np.ndarray]:
    """``[1, H, W]`` float32 images in [0, 1], at most 128 px a side."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F
    from PIL import Image

    chest = (
        sorted((data / "kermany-cxr-224").rglob("*.jpeg"))[:2] or sorted((data / "kermany-cxr-224").rglob("*.png"))[:2]
    )
    planes = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) for p in chest]
    volumes = sorted((data / "msd-hippocampus" / "images").glob("*.nii.gz"))[:2]
    for path in volumes:
        volume = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        planes.append(np.rot90(volume[:, :, volume.shape[2] // 2]).copy())
    images = []
    for plane in planes:
        low, high = np.percentile(plane, [0.5, 99.5])
        plane = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
        scale = min(1.0, 128 / max(plane.shape))
        size = (max(8, round(plane.shape[0] * scale)), max(8, round(plane.shape[1] * scale)))
        resized = F.interpolate(torch.from_numpy(plane)[None, None], size=size, mode="area")[0].numpy()
        images.append(resized.astype(np.float32))
    return images


def new_views(images: list[np.ndarray], draws: int) -> dict[str, np.ndarray]:
    from medssl.data.datasets import CachedItem, MultiCropSliceDataset
    from medssl.data.views import MultiCropConfig

    class Entry:
        def __init__(self, array: np.ndarray) -> None:
            self._array, self.scale, self.meta = array, 1.0, {"dtype": "float32"}

        def array(self) -> np.ndarray:
            return self._array

    class Row:
        dims, group, label, id = 2, "", "", "x"

    out = {}
    for i, image in enumerate(images):
        dataset = MultiCropSliceDataset([CachedItem(Row(), Entry(image))], views=MultiCropConfig())  # type: ignore[arg-type]
        for d in range(draws):
            for v, view in enumerate(dataset.sample_views((d, 0))):
                out[f"{i}_{d}_{v}"] = view.numpy()
    return out


def statistics(views: dict[str, np.ndarray]) -> dict[str, float]:
    values = [v for k, v in views.items()]
    pixels = np.concatenate([v.ravel() for v in values])
    gradient = np.mean([np.abs(np.diff(v, axis=-1)).mean() for v in values])
    return {
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        "zeros": float((pixels == 0).mean()),
        "gradient": float(gradient),
    }


def figure(images: list[np.ndarray], old: dict[str, np.ndarray], new: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_views = 6
    fig, axes = plt.subplots(2 * len(images), n_views + 1, figsize=(1.6 * (n_views + 1), 1.6 * 2 * len(images)))
    for i, image in enumerate(images):
        for r, (name, views) in enumerate((("old (MONAI, per sample)", old), ("new (on device, batch)", new))):
            row = axes[2 * i + r]
            row[0].imshow(image[0], cmap="gray", vmin=0, vmax=1)
            row[0].set_ylabel(name, fontsize=6)
            for v in range(n_views):
                row[v + 1].imshow(views[f"{i}_0_{v}"][0], cmap="gray", vmin=0, vmax=1)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=7)
    for v in range(n_views):
        axes[0][v + 1].set_title("global" if v < 2 else "local", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-tree", required=True, help="a checkout of a commit that still has the old path")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--draws", type=int, default=50, help="draws per image for the statistics")
    parser.add_argument("--update", help="write the section views_old_new into this Markdown file")
    args = parser.parse_args()
    images = load_images(Path(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "images.npy"
        array = np.empty(len(images), dtype=object)
        array[:] = images
        np.save(source, array, allow_pickle=True)
        env = {**os.environ, "PYTHONPATH": str(Path(args.old_tree).resolve())}
        subprocess.run(
            [sys.executable, "-c", OLD_VIEWS, str(source), str(Path(tmp) / "old.npz"), str(args.draws)],
            check=True,
            env=env,
            cwd=tmp,
        )
        with np.load(Path(tmp) / "old.npz") as loaded:
            old = {k: loaded[k] for k in loaded.files}
    new = new_views(images, args.draws)
    figure(images, old, new, FIGURE)
    stats = {"old": statistics(old), "new": statistics(new)}
    print(json.dumps(stats))
    lines = [
        "## Views: the old per-sample path and the new on-device path (`benchmarks/views_old_new.py`)",
        "",
        f"Command: `python benchmarks/views_old_new.py {' '.join(sys.argv[1:])}` (old path: the checkout given).",
        "",
        f"Default multi-crop settings (2 x 96 px + 4 x 48 px, global scale 0.14-1, local 0.05-0.14, aspect 3/4-4/3, "
        f"flip 0.5, rotation/zoom 0.5, gamma/contrast 0.5, noise 0.2, blur 0.2) on {len(images)} images "
        f"(2 Kermany X-rays, 2 hippocampus MR slices), {args.draws} draws each; pixel statistics over all views:",
        "",
        "| path | mean | std | share of exact zeros | mean abs horizontal gradient |",
        "|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['mean']:.3f} | {s['std']:.3f} | {100 * s['zeros']:.1f}% | {s['gradient']:.4f} |")
    link = os.path.relpath(FIGURE, Path(args.update).resolve().parent) if args.update else str(FIGURE)
    lines += ["", f"![views, old and new path]({link})", ""]
    text = "\n".join(lines)
    print(text)
    if args.update:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _report import update_section

        update_section(Path(args.update), text, tag="views_old_new")
    return 0


if __name__ == "__main__":
    sys.exit(main())
