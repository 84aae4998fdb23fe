"""Privacy guard: exact nearest training beat in the per-beat z-normalised waveform space.

Each beat is z-normalised on its own (mean 0, standard deviation 1 over all its values) and
flattened; the distance between two beats is the root-mean-square difference of those vectors,
so amplitude scaling or a baseline offset alone neither hides nor creates a near-copy. The
distance lies in [0, 2]: 0 for a copy, about sqrt(2) for unrelated beats, 2 for a sign flip.
"""

from __future__ import annotations

import numpy as np

from appliance.scoring import z_normalise

# Training vectors compared per matrix product. One block of 256 queries x 4096 vectors takes
# 4 MiB of float32 distances and 8 MiB of int64 positions for the partial sort. The C allocator
# keeps a call thread's peak after the call, so the block bounds what each server thread holds:
# blocks of 32768 vectors held about 100 MiB per thread on a 40,000-beat index, and searched
# no faster (benchmarks/privacy_search.py).
INDEX_CHUNK = 4096
# Queries searched together.
QUERY_BATCH = 256
# Candidates whose approximate distance is re-computed exactly in float64. float32 products
# of unit vectors err by about 1e-6 in squared distance, far below the gap between the nearest
# and the ninth-nearest training beat, so the nearest one is always among them.
EXACT_CANDIDATES = 8


def privacy_space(beats: np.ndarray) -> np.ndarray:
    """Map beats to the comparison space.

    Arguments:
        beats: Beats, shape (beats, leads, window_samples), any unit.

    Returns:
        Vectors of shape (beats, leads * window_samples), float32: the z-normalised beat divided
        by sqrt(leads * window_samples), so that the Euclidean distance of two vectors is the
        RMS difference of the two z-normalised beats. Non-constant beats have unit norm.
    """
    z = z_normalise(beats)
    return (z / np.sqrt(z.shape[1])).astype(np.float32)


class NearestNeighbourIndex:
    """Exact nearest-neighbour search by blocked matrix products (BLAS), then exact re-ranking.

    The search is brute force, so its cost is linear in the training beats: one query batch
    costs ``QUERY_BATCH * n * dims`` multiply-adds in float32.

    Arguments:
        vectors: Training vectors from ``privacy_space``, shape (n, dims).

    Raises:
        ValueError: If ``vectors`` is not a non-empty 2-D array.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"index needs a non-empty (n, dims) array, got {vectors.shape}")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.squared_norms = (self.vectors.astype(np.float64) ** 2).sum(axis=1)
        self.squared_norms32 = self.squared_norms.astype(np.float32)
        self.chunk_rows = INDEX_CHUNK

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def nearest_distance(self, queries: np.ndarray) -> np.ndarray:
        """Compute each query's distance to its nearest training vector.

        Arguments:
            queries: Vectors from ``privacy_space``, shape (m, dims).

        Returns:
            RMS differences of the z-normalised beats, shape (m,), float64. The nearest
            training beat itself is never returned.

        Raises:
            ValueError: If the queries' width differs from the training vectors'.
        """
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(
                f"queries must have shape (m, {self.vectors.shape[1]}), got {queries.shape}; "
                "map beats with privacy_space first"
            )
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.empty(queries.shape[0])
        for start in range(0, queries.shape[0], QUERY_BATCH):
            out[start : start + QUERY_BATCH] = self._search(queries[start : start + QUERY_BATCH])
        return out

    def _search(self, queries: np.ndarray) -> np.ndarray:
        m = queries.shape[0]
        best = np.full((m, EXACT_CANDIDATES), np.inf, dtype=np.float32)
        best_index = np.zeros((m, EXACT_CANDIDATES), dtype=np.int64)
        for start in range(0, self.vectors.shape[0], self.chunk_rows):
            block = self.vectors[start : start + self.chunk_rows]
            # ||v||^2 - 2 q.v ranks training vectors like ||q - v||^2, since ||q|| is fixed.
            approx = queries @ block.T  # (m, block rows), float32
            approx *= -2.0
            approx += self.squared_norms32[None, start : start + block.shape[0]]
            k = min(EXACT_CANDIDATES, block.shape[0])
            part = np.argpartition(approx, k - 1, axis=1)[:, :k]
            merged = np.concatenate([best, np.take_along_axis(approx, part, axis=1)], axis=1)
            merged_index = np.concatenate([best_index, part + start], axis=1)
            keep = np.argsort(merged, axis=1)[:, :EXACT_CANDIDATES]
            best = np.take_along_axis(merged, keep, axis=1)
            best_index = np.take_along_axis(merged_index, keep, axis=1)
        candidates = self.vectors[best_index].astype(np.float64)  # (m, k, dims)
        difference = candidates - queries[:, None, :].astype(np.float64)
        exact = np.sqrt((difference**2).sum(axis=2))
        exact[~np.isfinite(best)] = np.inf  # fewer training vectors than candidates
        return exact.min(axis=1)
