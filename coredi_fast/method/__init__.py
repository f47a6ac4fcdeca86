"""The CoReDi / ReDi method: feature projector, anti-collapse regularizers, monitors, feature statistics (computed,
or ReDi's published PCA file: `load_redi_pca`) and the alignment of encoder tokens with the latent grid."""
from .feature_grid import check_feature_grid, grid_to_tokens, tokens_to_grid, validate_channels
from .cross_rank import TokenBatchNorm, cross_rank_sum
from .monitors import channel_std, effective_rank, spectral_effective_rank, subspace_angles, token_covariance
from .projector import FeatureProjector, ProjectorConfig, ProjectorOutput
from .regularizers import VFLoss, covariance_loss, orthogonality_loss, vf_loss
from .objective import JointDiffusionObjective, JointNoise, ObjectiveConfig, ObjectiveOutput
from .statistics import PCA, FeatureStatistics, FixedFeatureStatistics
from .redi_pca import ReDiPCAFile, load_redi_pca, read_redi_pca

__all__ = [
    "FeatureProjector", "ProjectorConfig", "ProjectorOutput",
    "JointDiffusionObjective", "JointNoise", "ObjectiveConfig", "ObjectiveOutput",
    "TokenBatchNorm", "cross_rank_sum",
    "FeatureStatistics", "FixedFeatureStatistics", "PCA", "ReDiPCAFile", "load_redi_pca", "read_redi_pca",
    "orthogonality_loss", "covariance_loss", "vf_loss", "VFLoss",
    "effective_rank", "spectral_effective_rank", "subspace_angles", "channel_std", "token_covariance",
    "tokens_to_grid", "grid_to_tokens", "check_feature_grid", "validate_channels",
]
