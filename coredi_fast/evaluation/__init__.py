"""Sample-quality evaluation: FID, sFID, Inception Score, precision and recall, following OpenAI's ADM evaluator.

`metrics` is pure math on feature arrays; `inception` loads the TorchScript InceptionV3 and turns uint8 images into
features; `features` runs it in batches over npz files, image folders or arrays (split over torchrun ranks);
`reference` reads ADM reference batches and caches reference statistics; `cli` is `python evaluate.py`.
"""
from .features import Features, extract_features, open_images
from .inception import (FeatureNetwork, InceptionFeatures, InceptionLoadError, InceptionNotFoundError,
                        load_feature_network, resize_like_tf, to_inception_input)
from .metrics import (feature_statistics, frechet_distance, frechet_distance_eigh, inception_score, knn_radii,
                      precision_recall)
from .reference import GaussianStats, Reference, ReferenceFileError, load_reference, read_stored_statistics

__all__ = [
    "Features", "extract_features", "open_images",
    "FeatureNetwork", "InceptionFeatures", "InceptionLoadError", "InceptionNotFoundError", "load_feature_network",
    "resize_like_tf", "to_inception_input",
    "feature_statistics", "frechet_distance", "frechet_distance_eigh", "inception_score", "knn_radii",
    "precision_recall",
    "GaussianStats", "Reference", "ReferenceFileError", "load_reference", "read_stored_statistics",
]
