"""2-D embeddings of feature vectors: t-SNE (scikit-learn) or UMAP (optional umap-learn)."""

from __future__ import annotations

import importlib.util

import numpy as np

from genie_dg.errors import UserInputError

METHODS = ("tsne", "umap")


def check_method(method: str) -> None:
    """Fail before training when ``method`` is unknown or its package is missing."""
    if method not in METHODS:
        raise UserInputError(f"feature map method={method!r}: choose one of {list(METHODS)}")
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise UserInputError("feature map method=umap needs umap-learn: pip install umap-learn, or use method=tsne")


def embed(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    """``features`` (samples x dims) projected to 2-D; the same seed gives the same embedding."""
    check_method(method)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(features)
    from sklearn.manifold import TSNE

    # Perplexity must stay below the number of samples; 30 is the usual value.
    perplexity = min(30.0, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
