"""Expression tokenizers: one spot's log-expression vector [G] <-> a few ids.

Two schemes, fitted on training spots only:

* :class:`RVQExpressionTokenizer` -- residual vector quantisation of the per-gene
  standardised vector (optionally of its projection on the top ``pca_dim`` principal
  components of the training spots, which keeps the codebooks off the count noise):
  level q picks the nearest of K k-means centroids of what the previous levels left;
  a spot is Q tokens.  Short sequences, so a neighbourhood of
  spots fits.  ``decode(..., noise=True)`` adds a training residual (bootstrap) so that
  samples carry the measurement spread the codebooks cannot represent.
* :class:`BinnedExpressionTokenizer` -- every gene's value in a fixed gene order,
  binned per gene (a zero bin plus quantile bins of the non-zero values); a spot is G
  tokens, the type stream carries the gene index.

Two sequence layouts (``RVQExpressionTokenizer.window_radius``):

* per-spot (``None``): ``n_slots`` spots' tokens (centre spot first), type = slot * Q + level;
* window (an int R): per spot a *marker* token (id ``marker_id``) then its Q codes; the
  marker's type is the spot's 2D cell around the window centre (``(2R+1)**2`` cells), the
  codes' types are ``n_cells + level`` (see :mod:`armodal.modalities.spatial.window`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from armodal.modalities.base import Tokenizer, register_tokenizer

__all__ = ["ExpressionTokenizer", "RVQExpressionTokenizer", "BinnedExpressionTokenizer"]


class ExpressionTokenizer(Tokenizer):
    """Shared part: ids are ``1 + code``; ``pad_id = 0``; no BOS (the H&E prefix precedes)."""

    modality = "spatial"
    pad_id = 0
    bos_id = None
    eos_id = None
    tokens_per_spot: int
    genes: list[str]
    _encoder = None
    _encoder_dir: Path | None = None

    @property
    def encoder(self):
        """The H&E encoder (:class:`~armodal.modalities.spatial.features.FeatureExtractor`: stain normaliser +
        backbone) the model was trained with; saved next to the tokenizer so a new slide is featurised alike."""
        if self._encoder is None and self._encoder_dir is not None and (Path(self._encoder_dir) / "encoder.json").is_file():
            from armodal.modalities.spatial.features import FeatureExtractor  # noqa: PLC0415 (torch/timm only when needed)

            self._encoder = FeatureExtractor.load(self._encoder_dir)
        return self._encoder

    @encoder.setter
    def encoder(self, value) -> None:
        self._encoder = value

    def _save_encoder(self, directory: Path) -> None:
        if self._encoder is not None:
            self._encoder.save(directory)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def encode(self, item) -> torch.Tensor:
        """Expression [N, G] (log1p, panel order) -> ids [N * tokens_per_spot]."""
        x = np.asarray(item, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] != self.n_genes:
            raise ValueError(f"expression has {x.shape[1]} genes, the tokenizer's panel has {self.n_genes}")
        if not np.isfinite(x).all():
            raise ValueError(f"{int((~np.isfinite(x)).sum())} non-finite expression value(s)")
        return torch.from_numpy(self.encode_codes(x).reshape(-1) + 1).long()

    def decode(self, ids: torch.Tensor, noise: bool = False, generator: np.random.Generator | None = None) -> np.ndarray:
        """ids [N * tokens_per_spot] (pads and spot markers dropped) -> expression [N, G] (log1p, >= 0)."""
        ids = torch.as_tensor(ids).reshape(-1)
        keep = ids != self.pad_id
        if getattr(self, "marker_id", None) is not None:
            keep &= ids != self.marker_id
        ids = ids[keep].cpu().numpy() - 1
        n = len(ids) // self.tokens_per_spot
        codes = ids[: n * self.tokens_per_spot].reshape(n, self.tokens_per_spot)
        return self.decode_codes(codes, noise=noise, generator=generator)

    def decode_batch(self, ids: torch.Tensor, noise: bool = False, generator: np.random.Generator | None = None) -> np.ndarray:
        """ids [B, k * tokens_per_spot] (no pads) -> [B, k, G]."""
        ids = ids.cpu().numpy() - 1
        b = ids.shape[0]
        codes = ids.reshape(b, -1, self.tokens_per_spot)
        out = self.decode_codes(codes.reshape(-1, self.tokens_per_spot), noise=noise, generator=generator)
        return out.reshape(b, -1, self.n_genes)

    # hooks
    def encode_codes(self, x: np.ndarray) -> np.ndarray:  # [N, G] -> [N, tps] codes (0-based, level-offset)
        raise NotImplementedError

    def decode_codes(self, codes: np.ndarray, noise: bool, generator) -> np.ndarray:  # [N, tps] -> [N, G]
        raise NotImplementedError

    # decoding is additive: a spot's expression = decode_latent(sum over its slots of slot_values(slot)[id])
    def slot_values(self) -> np.ndarray:  # [tps, vocab, D]: each id's latent contribution at each slot of a spot
        raise NotImplementedError

    def decode_latent(self, z: np.ndarray, clip: bool = True) -> np.ndarray:  # [N, D] -> [N, G]
        raise NotImplementedError


# ----------------------------------------------------------------------------- residual VQ
@register_tokenizer("spatial.rvq")
class RVQExpressionTokenizer(ExpressionTokenizer):
    """Residual VQ with ``n_levels`` codebooks of ``codebook_size`` k-means centroids each.

    Token id for level q, code c: ``1 + q * K + c``.  Per-spot layout: ``types`` = position
    in the expression segment (slot * Q + level, ``n_slots`` spots per sequence).  Window
    layout (``window_radius`` set): one more id, the spot marker ``1 + Q * K``, typed by the
    spot's cell; the codes are typed by level.  Either way the grammar only allows level-q
    ids at level-q positions (and the marker at the start of every spot).
    """

    def __init__(self, genes, mean, std, codebooks, residuals, stats: dict | None = None, n_slots: int = 1,
                 proj=None, window_radius: int | None = None) -> None:
        self.n_slots = int(n_slots)
        self.window_radius = None if window_radius is None else int(window_radius)
        self.proj = None if proj is None or np.size(proj) == 0 else np.asarray(proj, np.float32)  # [d, G] PCA rows
        self.genes = list(genes)
        self.mean = np.asarray(mean, np.float32)  # [G]
        self.std = np.asarray(std, np.float32)  # [G]
        self.codebooks = np.asarray(codebooks, np.float32)  # [Q, K, G or d] in standardised (PCA) units
        self.residuals = np.asarray(residuals, np.float32)  # [n_train, G] standardised training residuals
        self.stats = dict(stats or {})
        self.tokens_per_spot = self.codebooks.shape[0]

    @property
    def n_levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    @property
    def marker_id(self) -> int | None:
        """The spot-marker id of window sequences (None in the per-spot layout)."""
        return None if self.window_radius is None else 1 + self.n_levels * self.codebook_size

    @property
    def n_cells(self) -> int:
        """Cell type ids of window sequences: the (2R+1)^2 cells around the window centre."""
        return 0 if self.window_radius is None else (2 * self.window_radius + 1) ** 2

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_levels * self.codebook_size + (self.window_radius is not None)

    @property
    def num_types(self) -> int:
        if self.window_radius is not None:
            return self.n_cells + self.n_levels
        return self.n_slots * self.n_levels

    @classmethod
    def fit(cls, x: np.ndarray, genes, n_levels: int = 4, codebook_size: int = 32, seed: int = 0,
            n_slots: int = 1, groups: np.ndarray | None = None, pca_dim: int = 0,
            window_radius: int | None = None) -> "RVQExpressionTokenizer":
        """Fit on training spots ``x`` [N, G] (log1p).

        ``groups`` (e.g. the section of each spot): the residual pool used by
        ``decode(noise=True)`` is then cross-fitted -- each group's residuals come from
        codebooks fitted on the other groups -- so the added spread matches the quantiser's
        error on unseen sections rather than its (smaller) error on its own training spots.
        """
        x = np.asarray(x, np.float32)
        mean, std = x.mean(0), x.std(0) + 1e-3
        proj = cls._pca((x - mean) / std, pca_dim)
        books, _, rms = cls._fit_books(cls._project((x - mean) / std, proj), n_levels, codebook_size, seed)
        probe = cls(genes, mean, std, books, np.zeros((1, x.shape[1]), np.float32), proj=proj)
        r = (x - mean) / std - (probe.decode_codes(probe.encode_codes(x), False, None, clip=False) - mean) / std
        stats = {"train_rms_after_level": rms, "residuals": "in-sample", "pca_dim": int(pca_dim)}
        if groups is not None and len(np.unique(groups)) > 1:
            groups = np.asarray(groups)
            pool = []
            for g in np.unique(groups):
                tr = groups != g
                m, sd = x[tr].mean(0), x[tr].std(0) + 1e-3
                pj = cls._pca((x[tr] - m) / sd, pca_dim)
                b, _, _ = cls._fit_books(cls._project((x[tr] - m) / sd, pj), n_levels, codebook_size, seed)
                other = cls(genes, m, sd, b, np.zeros((1, x.shape[1]), np.float32), proj=pj)
                rec_z = (other.decode_codes(other.encode_codes(x[~tr]), False, None, clip=False) - mean) / std
                pool.append((x[~tr] - mean) / std - rec_z)
            r = np.concatenate(pool)
            stats["residuals"] = "cross-fitted over groups"
        tok = cls(genes, mean, std, books, r, stats, n_slots, proj, window_radius)
        tok.stats["quantisation_rms_log1p"] = float(np.sqrt(((tok.decode_codes(tok.encode_codes(x), False, None) - np.maximum(x, 0)) ** 2).mean()))
        return tok

    @staticmethod
    def _pca(z: np.ndarray, dim: int) -> np.ndarray | None:
        if not dim or dim >= z.shape[1]:
            return None
        from sklearn.decomposition import PCA

        return PCA(n_components=min(dim, len(z) - 1), random_state=0).fit(z).components_.astype(np.float32)

    @staticmethod
    def _project(z: np.ndarray, proj: np.ndarray | None) -> np.ndarray:
        return z if proj is None else z @ proj.T

    @staticmethod
    def _fit_books(r: np.ndarray, n_levels: int, codebook_size: int, seed: int):
        from sklearn.cluster import KMeans

        books, rms = [], []
        for q in range(n_levels):
            k = min(codebook_size, len(np.unique(r, axis=0)))
            km = KMeans(n_clusters=k, n_init=3, random_state=seed + q).fit(r)
            c = km.cluster_centers_.astype(np.float32)
            if k < codebook_size:  # pad with copies so every level has K entries
                c = np.concatenate([c, np.repeat(c[:1], codebook_size - k, 0)])
            books.append(c)
            r = r - c[km.labels_]
            rms.append(float(np.sqrt((r**2).mean())))
        return np.stack(books), r, rms

    def encode_codes(self, x):
        r = self._project((x - self.mean) / self.std, self.proj)
        codes = np.empty((len(x), self.n_levels), np.int64)
        for q, book in enumerate(self.codebooks):
            d = (r**2).sum(1, keepdims=True) - 2 * r @ book.T + (book**2).sum(1)[None]
            c = d.argmin(1)
            codes[:, q] = c + q * self.codebook_size
            r = r - book[c]
        return codes

    def decode_codes(self, codes, noise=False, generator=None, clip: bool = True):
        codes = np.asarray(codes) % self.codebook_size  # level offset removed
        z = np.zeros((len(codes), self.codebooks.shape[2]), np.float32)
        for q in range(codes.shape[1]):
            z += self.codebooks[q][codes[:, q]]
        if not noise:
            return self.decode_latent(z, clip)
        g = generator or np.random.default_rng()
        z = (z @ self.proj if self.proj is not None else z) + self.residuals[g.integers(0, len(self.residuals), len(z))]
        x = z * self.std + self.mean
        return np.maximum(x, 0.0) if clip else x

    def slot_values(self):
        """[Q, vocab, D]: level q's id ``1 + q * K + c`` contributes codebook entry c (every other id 0)."""
        q, k, d = self.codebooks.shape
        out = np.zeros((q, self.vocab_size, d), np.float32)
        for lv in range(q):
            out[lv, 1 + lv * k: 1 + (lv + 1) * k] = self.codebooks[lv]
        return out

    def decode_latent(self, z, clip: bool = True):
        """Summed codebook entries [N, D] (PCA coordinates) -> expression [N, G] (log1p; >= 0 with ``clip``)."""
        z = np.asarray(z, np.float32)
        if self.proj is not None:
            z = z @ self.proj  # PCA coordinates -> standardised genes
        x = z * self.std + self.mean
        return np.maximum(x, 0.0) if clip else x

    def types(self, ids: torch.Tensor) -> torch.Tensor:
        if self.window_radius is not None:
            raise ValueError("window sequences take their type ids from the window geometry (each spot's cell): "
                             "build them with armodal.modalities.spatial.window.window_tokens")
        t = ids.shape[-1]
        return torch.arange(t, device=ids.device).clamp(max=self.num_types - 1).expand(ids.shape[0], t)

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        mask = torch.zeros(b, self.vocab_size, dtype=torch.bool, device=ids.device)
        if self.window_radius is not None:  # marker, then the Q levels, for every spot
            q = t % (self.n_levels + 1) - 1
            if q < 0:
                mask[:, self.marker_id] = True
                return mask
        else:
            q = t % self.n_levels
        mask[:, 1 + q * self.codebook_size : 1 + (q + 1) * self.codebook_size] = True
        return mask

    def state(self) -> dict:
        return {"genes": self.genes, "stats": self.stats, "n_slots": self.n_slots, "window_radius": self.window_radius}

    def save_extra(self, directory: Path) -> None:
        self._save_encoder(Path(directory))
        np.savez(Path(directory) / "rvq.npz", mean=self.mean, std=self.std, codebooks=self.codebooks, residuals=self.residuals,
                 proj=self.proj if self.proj is not None else np.zeros(0, np.float32))

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "RVQExpressionTokenizer":
        z = np.load(Path(directory) / "rvq.npz")
        tok = cls(state["genes"], z["mean"], z["std"], z["codebooks"], z["residuals"], state.get("stats"), state.get("n_slots", 1),
                  z["proj"] if "proj" in z.files else None, state.get("window_radius"))
        tok._encoder_dir = Path(directory)
        return tok


# ----------------------------------------------------------------------------- per-gene bins
@register_tokenizer("spatial.binned")
class BinnedExpressionTokenizer(ExpressionTokenizer):
    """Per-gene bins in a fixed gene order: bin 0 = zero, bins 1.. = quantiles of the non-zero values.

    A value decodes to the training mean of its bin, so the round-trip error of a value is
    at most its bin's width (``max_bin_width`` per gene).
    """

    def __init__(self, genes, edges, centres, stats: dict | None = None) -> None:
        self.genes = list(genes)
        self.edges = np.asarray(edges, np.float32)  # [G, B-1] upper edges of bins 1..B-2 (bin B-1 open)
        self.centres = np.asarray(centres, np.float32)  # [G, B]
        self.stats = dict(stats or {})
        self.tokens_per_spot = len(self.genes)

    @property
    def n_bins(self) -> int:
        return self.centres.shape[1]

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_bins

    @property
    def num_types(self) -> int:
        return len(self.genes)

    @classmethod
    def fit(cls, x: np.ndarray, genes, n_bins: int = 8) -> "BinnedExpressionTokenizer":
        x = np.asarray(x, np.float32)
        g = x.shape[1]
        edges = np.zeros((g, n_bins - 2), np.float32)
        centres = np.zeros((g, n_bins), np.float32)
        for j in range(g):
            nz = x[:, j][x[:, j] > 0]
            qs = np.quantile(nz, np.linspace(0, 1, n_bins)[1:-1]) if len(nz) else np.zeros(n_bins - 2)
            edges[j] = np.maximum.accumulate(qs)
        tok = cls(genes, edges, centres)
        b = tok._bin(x)
        for j in range(g):
            for k in range(1, n_bins):
                sel = x[b[:, j] == k, j].astype(np.float64)
                hi = edges[j, k - 1] if k - 1 < n_bins - 2 else np.inf
                lo = edges[j, k - 2] if k >= 2 else 0.0
                c = sel.mean() if len(sel) else (hi if np.isfinite(hi) else lo)
                # keep the centre inside its bin so that decoded values re-encode to the same bin
                centres[j, k] = np.float32(min(max(c, np.nextafter(np.float32(lo), np.float32(np.inf))), hi))
        tok.centres = centres
        hi = np.concatenate([np.zeros((g, 1)), edges, x.max(0)[:, None]], 1)
        tok.stats = {"max_bin_width": float(np.diff(hi, axis=1).max()),
                     "quantisation_rms_log1p": float(np.sqrt(((tok.decode_codes(b, False, None) - x) ** 2).mean()))}
        return tok

    def _bin(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros(x.shape, np.int64)
        for j in range(x.shape[1]):
            out[:, j] = np.where(x[:, j] > 0, 1 + np.searchsorted(self.edges[j], x[:, j], side="left"), 0)
        return out

    def encode_codes(self, x):
        return self._bin(x)

    def decode_codes(self, codes, noise=False, generator=None):
        codes = np.asarray(codes)
        return self.centres[np.arange(codes.shape[1])[None], codes]

    def slot_values(self):
        """[G, vocab, G]: gene j's id ``1 + bin`` puts the bin's centre on coordinate j."""
        g = self.n_genes
        out = np.zeros((g, self.vocab_size, g), np.float32)
        out[np.arange(g), 1:, np.arange(g)] = self.centres
        return out

    def decode_latent(self, z, clip: bool = True):
        z = np.asarray(z, np.float32)
        return np.maximum(z, 0.0) if clip else z

    def types(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[-1]
        return (torch.arange(t, device=ids.device) % self.n_genes).expand(ids.shape[0], t)

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(ids.shape[0], self.vocab_size, dtype=torch.bool, device=ids.device)
        mask[:, self.pad_id] = False
        return mask

    def state(self) -> dict:
        return {"genes": self.genes, "stats": self.stats}

    def save_extra(self, directory: Path) -> None:
        self._save_encoder(Path(directory))
        np.savez(Path(directory) / "bins.npz", edges=self.edges, centres=self.centres)

    @classmethod
    def from_state(cls, state: dict, directory: Path) -> "BinnedExpressionTokenizer":
        z = np.load(Path(directory) / "bins.npz")
        tok = cls(state["genes"], z["edges"], z["centres"], state.get("stats"))
        tok._encoder_dir = Path(directory)
        return tok
