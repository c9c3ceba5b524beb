"""A bundle's ``configs/inference.json``: medssl's preprocessing as MONAI transforms and a ``run`` that embeds files.

``python -m monai.bundle run --config_file <bundle>/configs/inference.json --bundle_root <bundle> --input_dir <folder>``
(or ``--datalist <file.json>``) writes ``output_file`` (default ``<bundle>/eval/embeddings.pt``): one ``[D]``
embedding per file, ``[N, D]`` in all, in the layout of ``medssl embed``'s ``.pt`` tables (``id``, ``level``,
``slice``, ``modality``, ``split``, ``label``, ``embedding``, ``metadata``; read it with ``torch.load(...,
weights_only=True)`` or :func:`medssl.downstream.embed.read_embeddings`). It runs with MONAI, PyTorch, nibabel and
Pillow only: the preprocessing is MONAI's transforms, never medssl's code, and a network that needs medssl to be
built (norms other than batch) runs from the bundle's TorchScript ``models/model.ts``.

The preprocessing reproduces :mod:`medssl.data.readers` and :mod:`medssl.data.preprocess` step by step:

=====================  ===========================================================================================
medssl                 bundle (MONAI)
=====================  ===========================================================================================
read a 2D image        ``LoadImaged`` (``PILReader``, rows x columns as displayed; colour -> Pillow's luminance
                       ``L``, which is the red channel of grey stored as RGB, as medssl reads it)
read a NIfTI, to RAS   ``LoadImaged`` (``NibabelReader``) + ``EnsureChannelFirstd`` + ``Orientationd("RAS")``
``spacing``              ``$resample``: MONAI's ``Spacing`` onto medssl's grid (origin kept, ``round(n * s / t)``
                       voxels, linear), after MONAI's ``GaussianSmooth`` with medssl's anti-aliasing sigma
                       ``(t / s - 1) / 2`` voxels when shrinking (replicated borders); skipped within 0.1 %
``max_side_2d``        the same ``$resample`` to ``max side / max_side_2d`` times the spacing (never upscales)
CT windows             ``ScaleIntensityRanged`` per ``[level, width]`` window (``CopyItemsd`` + ``ConcatItemsd``:
                       one channel each)
MR                     ``$normalise_mr``: MONAI's ``ScaleIntensityRange`` between the percentiles of the non-zero
                       voxels (all voxels when 16 or fewer are non-zero): MONAI has no non-zero percentile option
X-ray and other        ``ScaleIntensityRangePercentilesd`` (all pixels)
display orientation    ``Flipd`` (X, Y) + ``Transposed``: a volume ``[C, X, Y, Z]`` becomes ``[C, Z, H, W]``, every
                       axial slice as :func:`medssl.data.geometry.slice_to_display` shows it
=====================  ===========================================================================================

and then, as ``medssl embed`` (:mod:`medssl.downstream.embed`): the ``channels`` of each plane (channel 0, the first
CT window, for a one-channel encoder), resized to ``image_size`` x ``image_size`` (bilinear, anti-aliased:
``torch.nn.functional.interpolate``, which MONAI's ``Resize`` does not expose), the encoder's features of every plane,
and for a volume their mean over its axial slices (a 2D bundle) or the features of the whole ``[C, D, H, W]``
volume (a 3D bundle).

Not reproduced: DICOM (medssl applies the modality and VOI LUTs and inverts MONOCHROME1; convert DICOM to NIfTI or
embed it with ``medssl embed``), an image without contrast between the percentiles (medssl falls back to its minimum
and maximum), ITK's recursive Gaussian of the anti-aliasing (MONAI's is a sampled kernel: a downscaled input agrees
to about 2 % of the intensity range at worst, 0.3 % on average, and its features to a cosine similarity above 0.999)
and the last slice that medssl's resampler leaves at 0 when an upsampled grid ends half a voxel past the last input
voxel (here it repeats the border). Inputs that need no resampling agree to float precision, as the tests check. The
number of CT windows is fixed at export (their levels and widths can be overridden).

Identifiers: an embedding is named by the datalist's ``id``, else by ``sha256(id_salt + path relative to the folder
(or the datalist's folder), without its suffix)[:16]``, never by a path. Without a secret ``id_salt``, a hash of a
guessable name (a patient's) can be found by trying names: set ``id_salt`` or give ``id``s in a datalist.
"""

from __future__ import annotations

from typing import Any

OUTPUT_FORMAT = "medssl-embeddings v1"
"""``format`` of the ``.pt`` the run writes (``medssl embed``'s ``.pt`` layout)."""
IMAGE_SUFFIXES = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]
VOLUME_SUFFIXES = [".nii", ".nii.gz"]

# `$` expressions: only what MONAI has no transform for. A ConfigParser expression must not contain "::" (it becomes
# "#") nor "@" other than references.
_HELPERS: dict[str, str] = {
    "pil_to_grey": "$lambda image: image.convert('L') if image.mode in ('RGB', 'RGBA', 'P', 'LA', 'CMYK', 'YCbCr') "
    "else image",
    "smooth": "$lambda x, sigma: monai.transforms.CenterSpatialCrop(roi_size=x.shape[1:])(monai.transforms."
    "GaussianSmooth(sigma=sigma)(monai.transforms.BorderPad(spatial_border=int(4 * max(sigma)) + 2, "
    "mode='replicate')(x)))",
    "resample": "$lambda x, target, spacing: x if np.allclose(target, spacing, rtol=1e-3) else "
    "monai.transforms.Spacing(pixdim=target, mode='bilinear', padding_mode='border')("
    "@smooth(x, [max((t / s - 1.0) / 2.0, 1e-3) for s, t in zip(spacing, target)]) "
    "if any(t / s > 1.01 for s, t in zip(spacing, target)) else x, "
    "output_spatial_shape=[max(1, round(n * s / t)) for n, s, t in zip(x.shape[1:], spacing, target)])",
    "spacing_of": "$lambda x: [float(s) for s in x.pixdim]",
    "downscale_2d": "$lambda x: x if @max_side_2d is None or max(x.shape[1:]) <= @max_side_2d else "
    "@resample(x, [s * max(x.shape[1:]) / @max_side_2d for s in @spacing_of(x)], @spacing_of(x))",
    "resample_3d": "$lambda x: x if @spacing is None else @resample(x, [s if t is None else float(t) "
    "for s, t in zip(@spacing_of(x), @spacing)], @spacing_of(x))",
    "normalise_mr": "$lambda x: monai.transforms.ScaleIntensityRange(*[float(v) for v in np.percentile(np.asarray("
    "x[x > 0] if int((x > 0).sum()) > 16 else x), @percentiles)], 0.0, 1.0, clip=True)(x)",
    "is_volume": "$lambda path: str(path).lower().endswith(tuple(@volume_suffixes))",
    "readable": "$lambda path: os.path.isfile(path) and str(path).lower().endswith(tuple(@image_suffixes + "
    "@volume_suffixes))",
    "file_id": "$lambda path, root: hashlib.sha256((str(@id_salt) + re.sub(r'(\\.nii)?\\.[^./]*$', '', "
    "os.path.relpath(path, root).replace(os.sep, '/'))).encode('utf-8')).hexdigest()[:16]",
    "folder_items": "$lambda folder: [{'image': path, 'id': @file_id(path, folder)} for path in "
    "sorted(glob.glob(os.path.join(glob.escape(str(folder)), '**', '*'), recursive=True)) if @readable(path)]",
    "datalist_items": "$lambda path: [dict(item, id=str(item['id']) if item.get('id') not in (None, '') else "
    "@file_id(item['image'], os.path.dirname(os.path.abspath(path)))) for item in "
    "monai.data.load_decathlon_datalist(path, is_segmentation=False, data_list_key=@datalist_key)]",
    "fail": "$lambda message: exec('raise ValueError(message)', {'message': message})",
    "items": "$(@folder_items(@input_dir) if @input_dir else @datalist_items(@datalist) if @datalist else "
    "@fail('set input_dir (a folder of images and NIfTI volumes) or datalist (a JSON file)')) or "
    "@fail('no image (' + ', '.join(@image_suffixes) + ') or NIfTI volume to embed')",
    "planes": "$lambda x: monai.utils.convert_to_tensor(x[:, None] if x.ndim == 3 else x, track_meta=False)"
    "[@channels].transpose(0, 1).float()",
    "resize": "$lambda p: p if @image_size is None else torch.nn.functional.interpolate(p, size=(@image_size, "
    "@image_size), mode='bilinear', align_corners=False, antialias=True)",
    "features": "$torch.no_grad()(lambda batch: torch.cat([@inferer(b.to(@device), @network).flatten(1).float()"
    ".cpu() for b in batch.split(@batch_size)]))",
}
_EMBED_2D = "$lambda x: @features(@resize(@planes(x))).double().mean(0).float()"
_EMBED_3D = "$lambda x: @features(@resize(@planes(x)).transpose(0, 1)[None])[0]"


def _intensity(ct_windows: int) -> dict[str, Any]:
    """The three normalisations, chosen by ``modality`` at run time (CT windows: one channel per window)."""
    names = ["image"] + [f"image_window_{i}" for i in range(1, ct_windows)]
    ct: list[dict[str, Any]] = []
    if ct_windows > 1:
        ct.append({"_target_": "CopyItemsd", "keys": "image", "times": ct_windows - 1, "names": names[1:]})
    for i, name in enumerate(names):
        ct.append({
            "_target_": "ScaleIntensityRanged",
            "keys": name,
            "a_min": f"$@ct_windows[{i}][0] - @ct_windows[{i}][1] / 2.0",
            "a_max": f"$@ct_windows[{i}][0] + @ct_windows[{i}][1] / 2.0",
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        })  # fmt: skip
    if ct_windows > 1:
        ct.append({"_target_": "ConcatItemsd", "keys": names, "name": "image", "dim": 0})
        ct.append({"_target_": "DeleteItemsd", "keys": names[1:]})
    return {
        "CT": {"_target_": "Compose", "transforms": ct},
        "MR": {"_target_": "Lambdad", "keys": "image", "func": "@normalise_mr"},
        "OT": {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": "@percentiles#0",
            "upper": "@percentiles#1",
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    }


def inference_config(
    *,
    network_def: dict[str, Any],
    spatial_dims: int,
    preprocess: dict[str, Any],
    modality: str,
    channels: list[int],
    image_size: int | None,
    torchscript_network: bool,
    output_metadata: dict[str, Any],
) -> dict[str, Any]:
    """The bundle's ``configs/inference.json``.

    Args:
        network_def: the encoder's ``network_def`` (``monai.networks.nets.ResNet`` or medssl's builder).
        spatial_dims: 2 (planes ``[P, C, H, W]``, volumes pooled over their slices) or 3 (volumes ``[1, C, D, H, W]``).
        preprocess: the run's ``data.preprocess`` (``spacing``, ``max_side_2d``, ``ct_windows``, ``percentiles``).
        modality: the default normalisation (``CT``, ``MR`` or ``OT``); ``--modality`` overrides it.
        channels: preprocessed channels fed to the network (one per encoder input channel).
        image_size: planes resized to this square size (``None``: as preprocessed).
        torchscript_network: the run's ``network`` is ``models/model.ts`` (``torch.jit.load``) with ``model.pt``
            loaded into it, so that it runs without medssl; else ``network_def``.
        output_metadata: what the run records in its output's ``metadata`` (plain JSON values).
    """
    windows = [[float(level), float(width)] for level, width in preprocess.get("ct_windows") or [[40.0, 400.0]]]
    spacing = preprocess.get("spacing")
    network = (
        "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)"
        if torchscript_network
        else "$@network_def.to(@device)"
    )
    preprocessing_2d = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader", "reverse_indexing": False,
         "converter": "@pil_to_grey", "image_only": True, "dtype": "$np.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Lambdad", "keys": "image", "func": "@downscale_2d"},
        "@intensity",
    ]  # fmt: skip
    preprocessing_3d = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True,
         "dtype": "$np.float32"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
        {"_target_": "Lambdad", "keys": "image", "func": "@resample_3d"},
        "@intensity",
        {"_target_": "Flipd", "keys": "image", "spatial_axis": [0, 1]},
        {"_target_": "Transposed", "keys": "image", "indices": [0, 3, 2, 1]},
    ]  # fmt: skip
    return {
        "imports": ["$import glob", "$import hashlib", "$import os", "$import re", "$import monai", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        # what to embed and where the embeddings go
        "input_dir": None,
        "datalist": None,
        "datalist_key": "test",
        "output_file": "$@bundle_root + '/eval/embeddings.pt'",
        "id_salt": "",
        "modality": modality,
        "image_size": image_size,
        "channels": channels,
        "batch_size": 64,
        "num_workers": 0,
        "image_suffixes": IMAGE_SUFFIXES,
        "volume_suffixes": VOLUME_SUFFIXES,
        # medssl's preprocessing settings of the pretraining run (configs/metadata.json -> medssl)
        "spacing": spacing,
        "max_side_2d": preprocess.get("max_side_2d"),
        "ct_windows": windows,
        "percentiles": [float(p) for p in preprocess.get("percentiles") or [0.5, 99.5]],
        # the encoder
        "network_def": network_def,
        "network": network,
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": (
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True), strict=True)"
        ),
        "inferer": {"_target_": "SimpleInferer"},
        **_HELPERS,
        # the preprocessing
        "intensity_by_modality": _intensity(len(windows)),
        "intensity": "$@intensity_by_modality.get(str(@modality).upper(), @intensity_by_modality['OT'])",
        "preprocessing_2d": {"_target_": "Compose", "transforms": preprocessing_2d},
        "preprocessing_3d": {"_target_": "Compose", "transforms": preprocessing_3d},
        "preprocessing": "$lambda item: @preprocessing_3d(item) if @is_volume(item['image']) else "
        "@preprocessing_2d(item)",
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': item['image']} for item in @items]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "embed": _EMBED_2D if spatial_dims == 2 else _EMBED_3D,
        "embeddings": "$torch.stack([@embed(batch['image'][0]) for batch in @dataloader])",
        "ids": "$[item['id'] for item in @items]",
        "output_metadata": {
            **output_metadata,
            "modality": "@modality",
            "image_size": "@image_size",
            "channels": "@channels",
            "spacing": "@spacing",
            "max_side_2d": "@max_side_2d",
            "ct_windows": "@ct_windows",
            "percentiles": "@percentiles",
        },
        "table": {
            "format": OUTPUT_FORMAT,
            "id": "@ids",
            "level": "$['volume' if @is_volume(item['image']) else 'image' for item in @items]",
            "slice": "$torch.full((len(@ids),), -1, dtype=torch.int64)",
            "modality": "$[str(@modality).upper()] * len(@ids)",
            "split": "$[str(item.get('split', '')) for item in @items]",
            "label": "$[str(item.get('label', '')) for item in @items]",
            "embedding": "@embeddings",
            "metadata": "@output_metadata",
        },
        "run": [
            "$@load_weights",
            "$@network.eval()",
            "$os.makedirs(os.path.dirname(os.path.abspath(@output_file)), exist_ok=True)",
            "$torch.save(@table, @output_file)",
            "$print('medssl bundle: ' + str(len(@ids)) + ' embeddings [N, D] = ' + str(list(@embeddings.shape)) + "
            "' written to ' + str(@output_file))",
        ],
    }
