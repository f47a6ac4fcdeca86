"""Import ReDi's published PCA (`pcs/dino_pca_model.pth` of zelaki/ReDi) without running any pickled code.

What the file holds (ReDi's `calc_pca.py`): `torch.save({"pca_model": pca, "mean": mean, "std": std})` with

    mean, std    numpy (768,) float32: np.mean / np.std (population std) over DINOv2-B/14-reg patch tokens
    pca          sklearn.decomposition.PCA(n_components=768, whiten=args.whiten), fitted on (f - mean) / std;
                 its mean_ (768,) and components_ (768, 768), rows sorted by explained variance, are what ReDi uses

and how ReDi's training (`train_redi.py`) projects DINOv2 tokens f (B, 256, 768) to its `pca_rank` channels:

    z = ((f - mean) / std - pca.mean_) @ pca.components_[:pca_rank].T

with no whitening even for a file fitted with whiten=True (sklearn's `transform` would divide by
sqrt(explained_variance_); ReDi's training never does, so neither do we). For the shipped file (whiten=False) this is
exactly `pca.transform((f - mean) / std)[:, :pca_rank]`. `load_redi_pca` returns these arrays as
`FixedFeatureStatistics`, which the projector applies with that formula (mode "pca": ReDi; mode "learned" with
init "pca": CoReDi starting from ReDi's basis).

Safety. A torch.save file is a zip archive around a pickle, and unpickling may call any importable function. The file
is read with a restricted unpickler that resolves only: numpy's array and scalar rebuilders (`_reconstruct`,
`scalar`, under numpy 1's `numpy.core` and numpy 2's `numpy._core` names), `numpy.ndarray`, `numpy.dtype`,
`_codecs.encode` for latin-1 only (how protocol 2 stores bytes), and sklearn's PCA class *name*, which is mapped to
a plain stand-in class whose `__dict__` receives the fitted fields (sklearn is never imported and none of its code
runs). Any other global, and any torch tensor storage, refuses the file with a ValueError naming it.

Why not torch.load(weights_only=True): it reads this file only with an allow-list that maps the sklearn name to a
stand-in (`safe_globals([(StandIn, "sklearn.decomposition._pca.PCA")])`), which needs torch >= 2.6, while this
package supports torch >= 2.4; the reader below is the same restriction in thirty lines, independent of torch.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import NamedTuple, Union

import numpy as np
import torch

from .statistics import FixedFeatureStatistics

_REQUIRED_KEYS = ("mean", "std", "pca_model")


class SklearnPCAFields:
    """Stand-in for a pickled `sklearn.decomposition.PCA`: a plain object whose attributes are the pickled fields
    (mean_, components_, explained_variance_, whiten, n_samples_, ...). Nothing of sklearn is imported or run."""


def _latin1_bytes(text, encoding):
    """`_codecs.encode` as protocol-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how a pickle "
                                     f"stores bytes")
    return text.encode("latin1")


_RECONSTRUCT = np.zeros(1).__reduce__()[0]   # numpy's array rebuilder under any numpy version
_SCALAR = np.float64(0).__reduce__()[0]      # numpy's scalar rebuilder
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("sklearn.decomposition._pca", "PCA"): SklearnPCAFields,
    ("sklearn.decomposition.pca", "PCA"): SklearnPCAFields,   # scikit-learn < 0.22
    ("sklearn.decomposition", "PCA"): SklearnPCAFields,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of `_ALLOWED`; refuses torch tensor storages (ReDi's file has none)."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which ReDi's PCA file never contains "
                                         f"(numpy arrays and a fitted PCA's fields only)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds torch tensors; ReDi's calc_pca.py stores numpy arrays only")


def _unpickle_torch_zip(path: str):
    """The object inside a torch.save zip archive, through `_RestrictedUnpickler`."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.save zip archive (what ReDi's calc_pca.py writes)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a torch.save archive holds one data.pkl, this one has {len(pickles)}")
        payload = archive.read(pickles[0])
    try:
        return _RestrictedUnpickler(io.BytesIO(payload)).load()
    except (pickle.UnpicklingError, TypeError, ValueError, EOFError, AttributeError) as e:
        raise ValueError(f"{path}: refused to load: {e}. Nothing from the file was run.") from None


class ReDiPCAFile(NamedTuple):
    """The arrays of a ReDi PCA file, float64. D = encoder channels, K = stored components (768 in ReDi's file).

    mean, std: (D,) token statistics; pca_mean: (D,) the PCA's mean_ (of the standardized tokens);
    components: (K, D) rows = principal directions, by decreasing explained variance;
    explained_variance: (K,) or None; whiten: the PCA's flag (ignored, as ReDi's training ignores it);
    n_samples: tokens the PCA was fitted on (0 when not stored).
    """
    mean: np.ndarray
    std: np.ndarray
    pca_mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray | None
    whiten: bool
    n_samples: int


def _float_array(path: str, name: str, value, shape: tuple) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise ValueError(f"{path}: {name} must be a floating-point numpy array, got "
                         f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.shape != shape:
        raise ValueError(f"{path}: {name} has shape {value.shape}, expected {shape}")
    if not np.isfinite(value).all():
        raise ValueError(f"{path}: {name} holds NaN or inf")
    return value.astype(np.float64)


def read_redi_pca(path: Union[str, os.PathLike]) -> ReDiPCAFile:
    """Read and check a ReDi PCA file (see the module doc); ValueError naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ReDi PCA file not found: {path}")
    blob = _unpickle_torch_zip(path)
    if not isinstance(blob, dict) or any(key not in blob for key in _REQUIRED_KEYS):
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path}: expected calc_pca.py's dict with keys {list(_REQUIRED_KEYS)}, got {found}")
    pca = blob["pca_model"]
    if not isinstance(pca, SklearnPCAFields) or not hasattr(pca, "mean_") or not hasattr(pca, "components_"):
        raise ValueError(f"{path}: pca_model is not a fitted sklearn PCA (no mean_ / components_)")
    dim = getattr(blob["mean"], "shape", (0,))[0] if getattr(blob["mean"], "ndim", 0) == 1 else 0
    mean = _float_array(path, "mean", blob["mean"], (dim,))
    std = _float_array(path, "std", blob["std"], (dim,))
    pca_mean = _float_array(path, "pca_model.mean_", pca.mean_, (dim,))
    count = getattr(pca.components_, "shape", (0,))[0]
    components = _float_array(path, "pca_model.components_", pca.components_, (count, dim))
    if dim == 0 or count == 0:
        raise ValueError(f"{path}: empty statistics (mean has shape {mean.shape}, components {components.shape})")
    if (std <= 0).any():
        raise ValueError(f"{path}: std is {std.min():g} for channel {int(std.argmin())}; ReDi divides by it")
    gram_error = float(np.abs(components @ components.T - np.eye(count)).max())
    if gram_error > 1e-3:
        raise ValueError(f"{path}: pca_model.components_ are not orthonormal (max |C C^T - I| = {gram_error:.3g})")
    variance = getattr(pca, "explained_variance_", None)
    if variance is not None:
        variance = _float_array(path, "pca_model.explained_variance_", variance, (count,))
    return ReDiPCAFile(mean, std, pca_mean, components, variance, bool(getattr(pca, "whiten", False)),
                       int(getattr(pca, "n_samples_", 0) or 0))


def load_redi_pca(path: Union[str, os.PathLike]) -> FixedFeatureStatistics:
    """ReDi's PCA file as `FixedFeatureStatistics` (float64 copies of the stored float32 values, which the
    projector's float32 buffers hold exactly): give it to `FeatureProjector` like computed statistics."""
    stored = read_redi_pca(path)
    as_tensor = torch.from_numpy
    return FixedFeatureStatistics(
        mean=as_tensor(stored.mean), std=as_tensor(stored.std), pca_mean=as_tensor(stored.pca_mean),
        components=as_tensor(stored.components),
        eigenvalues=None if stored.explained_variance is None else as_tensor(stored.explained_variance),
        count=stored.n_samples, source=os.fspath(path), whiten=stored.whiten)
