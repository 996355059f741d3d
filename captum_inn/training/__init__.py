"""Fitting flows to hooked layers: feature caches, ``fit_*`` functions, checkpoints.

The public entry points are :func:`fit_autoencoder`, :func:`fit_invariances` and :func:`fit_concepts`; each reads like a
plain loop (:func:`~captum_inn.training.train_loop`), show a progress bar, are seeded, and
write atomic safetensors checkpoints that a later call resumes.
"""

from captum_inn._fingerprints import weights_fingerprint
from captum_inn.training.augment import Jitter
from captum_inn.training.autoencoder import (
    AutoencoderConfig,
    fit_autoencoder,
    load_autoencoder,
    save_autoencoder,
)
from captum_inn.training.cache import (
    FeatureCache,
    cache_features,
    forward_args_fingerprint,
    images_fingerprint,
    source_fingerprint,
)
from captum_inn.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captum_inn.training.concepts import (
    ConceptConfig,
    LayerRepresentation,
    concept_scores,
    estimate_factor_sizes,
    fit_concepts,
    load_concept_inn,
    save_concept_inn,
)
from captum_inn.training.invariances import (
    InvarianceConfig,
    fit_invariances,
    load_invariance_inn,
    save_invariance_inn,
)
from captum_inn.training.loop import train_loop

__all__ = [
    "AutoencoderConfig",
    "CheckpointError",
    "ConceptConfig",
    "LayerRepresentation",
    "concept_scores",
    "estimate_factor_sizes",
    "fit_concepts",
    "load_concept_inn",
    "save_concept_inn",
    "FeatureCache",
    "Jitter",
    "InvarianceConfig",
    "cache_features",
    "forward_args_fingerprint",
    "images_fingerprint",
    "source_fingerprint",
    "weights_fingerprint",
    "fit_autoencoder",
    "fit_invariances",
    "load_autoencoder",
    "load_checkpoint",
    "load_invariance_inn",
    "save_autoencoder",
    "save_checkpoint",
    "save_invariance_inn",
    "train_loop",
]
