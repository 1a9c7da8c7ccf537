"""Pictures of products added through the service, kept in the run's uploads folder
(:attr:`fashionrec.rundir.RunDir.uploads`).

An add request saves its files as an :class:`UploadBatch`; whatever happens, the files
of products that were not added are deleted when the request ends
(:meth:`UploadBatch.discard`, called in a ``finally``). A removed product's picture is
deleted only when it lies in the uploads folder (the service stored it).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from ..rundir import RunDir

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class Uploads:
    """The uploads folder of the run in ``run_dir``."""

    def __init__(self, run_dir):
        self.folder = RunDir(run_dir).uploads

    def batch(self):
        """A new :class:`UploadBatch` (the files of one request)."""
        return UploadBatch(self.folder)

    def holds(self, path):
        """Whether ``path`` is a file directly in the uploads folder."""
        return Path(path).resolve().parent == self.folder.resolve()

    def delete_picture(self, path):
        """Delete a removed product's picture if this service stored it (in the uploads
        folder); a picture anywhere else is the catalog owner's and stays."""
        if path and self.holds(path):
            Path(path).unlink(missing_ok=True)


def file_name(filename):
    """A fresh, safe file name for an upload called ``filename`` by the client."""
    name = Path(filename or "image")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name.stem)[:40]
    suffix = name.suffix.lower() if name.suffix.lower() in EXTENSIONS else ".png"
    return f"{uuid.uuid4().hex[:12]}-{stem or 'image'}{suffix}"


class UploadBatch:
    """The files one request saved, and the client's name for each."""

    def __init__(self, folder):
        self.folder = folder
        self.paths, self.names = [], []
        self._kept = set()

    async def save(self, upload):
        """Write ``upload`` (a Starlette ``UploadFile``) into the uploads folder."""
        data = await upload.read()
        self.folder.mkdir(exist_ok=True)
        path = self.folder / file_name(upload.filename)
        self.paths.append(path)  # listed first: a half-written file is discarded too
        self.names.append(upload.filename or path.name)
        path.write_bytes(data)
        return path

    def keep(self, paths):
        """Keep ``paths`` (their products were added) when the batch is discarded."""
        self._kept.update(paths)

    def discard(self):
        """Delete every file of the batch that was not kept."""
        for path in self.paths:
            if path not in self._kept:
                path.unlink(missing_ok=True)

    def public(self, text):
        """``text`` with the saved files' paths replaced by the client's file names
        (messages from the library name the files it read)."""
        for path, name in zip(self.paths, self.names, strict=True):
            for spelled in sorted({str(path.resolve()), str(path)}, key=len, reverse=True):
                text = text.replace(spelled, name)
        return text
