"""fashionrec — recommend visually similar products from their images.

A two-stage model: a frozen ImageNet ResNet50 extracts features; a class-weighted
MLP head is trained on them; its 512-d mid-layer, re-standardized, is the space
the catalog is ranked in by Euclidean distance.

Example:
    >>> from fashionrec import Recommender
    >>> rec = Recommender.load("runs/default")       # doctest: +SKIP
    >>> print(rec.recommend(5033, k=6).format_text())  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .config import RunConfig  # noqa: E402
from .data import Dataset, load_dataset  # noqa: E402
from .embedder import Embedder  # noqa: E402
from .errors import FashionrecError  # noqa: E402
from .extract import BackboneInfo, FeatureExtractor, build_backbone  # noqa: E402
from .head import ClassifierHead  # noqa: E402
from .index import CatalogIndex, knn_search  # noqa: E402
from .recommend import Recommender  # noqa: E402
from .results import Item, Recommendation  # noqa: E402
from .rundir import RunDir, StaleVersion  # noqa: E402
from .store import CatalogStore, IndexStore  # noqa: E402

__all__ = [
    "BackboneInfo", "CatalogIndex", "CatalogStore", "ClassifierHead", "Dataset", "Embedder",
    "FashionrecError", "FeatureExtractor", "IndexStore", "Item", "Recommendation",
    "Recommender", "RunConfig", "RunDir", "StaleVersion", "build_backbone", "knn_search",
    "load_dataset", "__version__",
]
