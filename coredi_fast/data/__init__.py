"""Data: preprocessing into shards, datasets, the sampler, and the torch / DALI loaders.

    # once: python preprocess.py --input /data/imagenet/train --output /data/in256 --image-size 256
    from coredi_fast.data import ShardedImageDataset, build_loader
    dataset = ShardedImageDataset("/data/in256")
    loader = build_loader(dataset, global_batch_size=256, rank=rank, world_size=world, seed=0,
                          encoder_resolution=224)              # DALI on GPU when installed, else torch
    for epoch in range(epochs):
        for batch in loader:                                   # image uint8 (b,3,256,256), moments (b,8,32,32),
            ...                                                # label, index, encoder_input (b,3,224,224)
    checkpoint["data"] = loader.state_dict()                   # exact resume: loader.load_state_dict(...)

Datasets share one interface: `len(ds)`, `ds.read(i) -> Sample(image, moments, label)`, `ds.image_size`,
`ds.num_classes`, `ds.has_moments`, `ds.moments_layout`, `ds.encoded`, `ds.channels`.
The DALI loader is imported lazily: the package works without DALI.
"""
from .batches import decode_image_bytes
from .center_crop import center_crop_arr
from .digits import DigitsDataset, digits_images, write_digits_image_folder
from .encoder_input import IMAGENET_MEAN, IMAGENET_STD, encoder_input
from .flip import check_hflip, draw_hflip_mask, hflip_where
from .repa_folder import RepaFolderDataset
from .sampler import ShardedSampler
from .shards import Sample, ShardedImageDataset, read_manifest
from .torch_loader import TorchLoader, build_loader

__all__ = [
    "Sample", "ShardedImageDataset", "RepaFolderDataset", "DigitsDataset", "ShardedSampler",
    "TorchLoader", "DaliLoader", "build_loader", "decode_image_bytes",
    "center_crop_arr", "encoder_input", "IMAGENET_MEAN", "IMAGENET_STD",
    "check_hflip", "draw_hflip_mask", "hflip_where",
    "digits_images", "write_digits_image_folder", "read_manifest", "preprocess_folder",
]


def __getattr__(name):
    # Lazy: DALI (and the preprocessing CLI) load only when asked for.
    if name == "DaliLoader":
        from .dali_loader import DaliLoader

        return DaliLoader
    if name == "preprocess_folder":
        from .preprocess import preprocess_folder

        return preprocess_folder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
