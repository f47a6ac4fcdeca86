"""Sample quality in the independent classifier's eyes: FD_cls, class accuracy, precision and recall.

    judge = ClassifierJudge(reference_images)              # uint8 (N, 1, 16, 16): the real training images
    scores = judge.evaluate(samples, requested_labels)     # JudgeScores(fd, accuracy, precision, recall, class_counts)
    scores = judge.evaluate(samples)                       # unconditional samples: accuracy is NaN

FD_cls is FID with the digits CNN (`classifier.py`) in place of InceptionV3: the Fréchet distance between Gaussians
fitted to the 64-d penultimate (pre-ReLU) features of the samples and of the reference images (`evaluation.metrics`,
the same code as FID). Like FID it is biased upward for small sample counts, so runs are only compared at equal
sample counts. The reference is the whole training set (all classes), for class-balanced conditional samples and for
unconditional samples alike. Accuracy is the share of class-conditional samples the classifier reads as the class
they were asked for. Precision / recall are Kynkäänniemi et al.'s k-NN manifold estimates (k = 3) in the same
feature space. class_counts is how many samples the classifier reads as each class (`spread.py` turns it into
coverage statistics).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..evaluation.metrics import feature_statistics, frechet_distance, precision_recall
from .classifier import DigitsCNN, images_to_input, load_digits_classifier
from .spread import class_counts


class JudgeScores(NamedTuple):
    fd: float          # Fréchet distance to the reference in the classifier's feature space (lower is better)
    accuracy: float    # share of samples classified as the label they were generated for
    precision: float   # share of samples inside the reference manifold
    recall: float      # share of reference images inside the samples' manifold
    class_counts: tuple = ()   # samples the classifier reads as each class (num_classes ints)


class ClassifierJudge:
    """Scores generated digits against a fixed set of real images.

    Args:
        reference_images: uint8 (N, C, H, W) real images (the diffusion models' training set).
        classifier: a `DigitsCNN`; default: the shipped weights.
        batch_size: images per classifier call.
    """

    def __init__(self, reference_images: torch.Tensor, classifier: Optional[DigitsCNN] = None,
                 batch_size: int = 512):
        self.classifier = classifier if classifier is not None else load_digits_classifier()
        self.batch_size = batch_size
        self.reference_features = self.features(reference_images)             # (N, F) float64
        self.reference_mu, self.reference_sigma = feature_statistics(self.reference_features)

    @torch.no_grad()
    def _run(self, images: torch.Tensor):
        feats, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            x = images_to_input(images[start:start + self.batch_size])
            f = self.classifier.features(x)
            feats.append(f)
            logits.append(self.classifier.logits_from_features(f))
        return torch.cat(feats).double().numpy(), torch.cat(logits)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (N, C, H, W) -> (N, F) float64 penultimate (pre-ReLU) features."""
        return self._run(images)[0]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> (N,) predicted class."""
        return self._run(images)[1].argmax(1)

    def fd(self, images: torch.Tensor) -> float:
        """FD_cls of uint8 images (N >= 2) against the reference."""
        mu, sigma = feature_statistics(self.features(images))
        return frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)

    def evaluate(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, k: int = 3) -> JudgeScores:
        """images uint8 (N, C, H, W), labels (N,) the classes they were generated for (None: unconditional
        samples, accuracy NaN)."""
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        feats, logits = self._run(images)
        mu, sigma = feature_statistics(feats)
        fd = frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)
        predicted = logits.argmax(1)
        accuracy = math.nan if labels is None else (predicted == labels.to(logits.device)).double().mean().item()
        precision, recall = precision_recall(self.reference_features, feats, k=k, dtype=torch.float64)
        counts = tuple(class_counts(predicted.cpu(), logits.shape[1]))
        return JudgeScores(fd, accuracy, precision, recall, counts)
