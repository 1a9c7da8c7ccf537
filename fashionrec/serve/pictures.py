"""Item pictures as the image route sends them: PNG, at display size, encoded once and
kept in memory (bounded in bytes, least recently used first out), so a product page
does not decode each original photo again on every request."""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict

import numpy as np


def png_bytes(image):
    """An image array (values 0-255) as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class DisplayCache:
    """Encoded pictures of file-backed items, keyed by the run, the item and its file
    (path, size and modification time: a replaced file is read again); at most
    ``max_bytes`` of them (``0``: none kept). Thread-safe."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._entries, self._bytes = OrderedDict(), 0
        self._lock = threading.Lock()

    def picture(self, rec, item_id):
        """The PNG of ``item_id``'s picture in ``rec``'s catalog, or ``None`` if its
        file is gone; a :class:`~fashionrec.errors.FashionrecError` if there is no such
        item."""
        path = rec.item(item_id).path
        key = None
        if path and self.max_bytes:
            try:
                st = os.stat(path)
                key = (rec.run_id_, str(item_id), path, st.st_size, st.st_mtime_ns)
            except OSError:
                return None
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
        image = rec.item_image(item_id)
        if image is None:
            return None
        data = png_bytes(image)
        if key is not None and len(data) <= self.max_bytes:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = data
                    self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    self._bytes -= len(self._entries.popitem(last=False)[1])
        return data
