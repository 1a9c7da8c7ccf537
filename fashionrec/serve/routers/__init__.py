"""The service's routes, one :class:`fastapi.APIRouter` per concern; each route gets
the app's :class:`~fashionrec.serve.context.Context` as a dependency.

* :mod:`.probes` — health, readiness, stats, Prometheus metrics;
* :mod:`.items` — browse, one item, items similar to an item, its picture, add, remove;
* :mod:`.photos` — items similar to an uploaded photo.
"""

from . import items, photos, probes

ROUTERS = (probes.router, items.router, photos.router)

__all__ = ["ROUTERS"]
