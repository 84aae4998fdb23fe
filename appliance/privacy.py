"""Privacy guard: exact nearest training beat in the per-beat z-normalised waveform space.

Each beat is z-normalised on its own (mean 0, standard deviation 1 over all its values) and
flattened; the distance between two beats is the root-mean-square difference of those vectors,
so amplitude scaling alone neither hides nor creates a near-copy.
"""

from __future__ import annotations

import numpy as np

# Training vectors compared per matrix product; bounds memory to about 256 MiB of float32
# distances per query batch of 512.
INDEX_CHUNK = 131072
# Candidates whose approximate distance is re-computed exactly in float64.
EXACT_CANDIDATES = 8
_MIN_STD = 1e-8


def privacy_space(beats: np.ndarray) -> np.ndarray:
    """Map beats to the comparison space.

    Arguments:
        beats: Beats, shape (beats, leads, window_samples), any unit.

    Returns:
        Vectors of shape (beats, leads * window_samples), float32: the z-normalised beat divided
        by sqrt(leads * window_samples), so that the Euclidean distance of two vectors is the
        RMS difference of the two z-normalised beats.
    """
    flat = beats.reshape(beats.shape[0], -1).astype(np.float64)
    centred = flat - flat.mean(axis=1, keepdims=True)
    std = centred.std(axis=1, keepdims=True)
    z = centred / np.maximum(std, _MIN_STD)
    return (z / np.sqrt(z.shape[1])).astype(np.float32)


class NearestNeighbourIndex:
    """Exact nearest-neighbour search by blocked matrix products (BLAS), then exact re-ranking.

    Arguments:
        vectors: Training vectors from ``privacy_space``, shape (n, dims).
    """

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"index needs a non-empty (n, dims) array, got {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.squared_norms = (self.vectors.astype(np.float64) ** 2).sum(axis=1)

    def nearest_distance(self, queries: np.ndarray) -> np.ndarray:
        """Return each query's distance to its nearest training vector.

        Arguments:
            queries: Vectors from ``privacy_space``, shape (m, dims).

        Returns:
            RMS differences of the z-normalised beats, shape (m,), float64.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        m = queries.shape[0]
        query_norms = (queries.astype(np.float64) ** 2).sum(axis=1)
        best = np.full((m, EXACT_CANDIDATES), np.inf)
        best_index = np.zeros((m, EXACT_CANDIDATES), dtype=np.int64)
        for start in range(0, self.vectors.shape[0], INDEX_CHUNK):
            block = self.vectors[start : start + INDEX_CHUNK]
            approx = (
                query_norms[:, None]
                + self.squared_norms[None, start : start + block.shape[0]]
                - 2.0 * (queries @ block.T).astype(np.float64)
            )
            k = min(EXACT_CANDIDATES, block.shape[0])
            part = np.argpartition(approx, k - 1, axis=1)[:, :k]
            merged = np.concatenate([best, np.take_along_axis(approx, part, axis=1)], axis=1)
            merged_index = np.concatenate([best_index, part + start], axis=1)
            keep = np.argsort(merged, axis=1)[:, :EXACT_CANDIDATES]
            best = np.take_along_axis(merged, keep, axis=1)
            best_index = np.take_along_axis(merged_index, keep, axis=1)
        candidates = self.vectors[best_index].astype(np.float64)  # (m, k, dims)
        exact = np.sqrt(((candidates - queries[:, None, :].astype(np.float64)) ** 2).sum(axis=2))
        return exact.min(axis=1)
