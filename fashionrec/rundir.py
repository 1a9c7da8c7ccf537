"""The run folder: the only code that knows its file names.

A run folder holds one published *model version* at a time, plus what every version
shares::

    RUN_DIR/
      run.json              the current version's record (config, backbone, dataset,
                            scores, search) and which version folder it is: the
                            pointer that publishing replaces atomically
      versions/<run_id>/    one model version: head.keras, head.json, head_weights.h5,
                            (OpenVINO runs) backbone.xml + .bin, embedder.json,
                            index.h5 (+ index.manifest.json, index.d/, index.lock: the
                            living catalog), split.json, catalog_report.json
      features/             the feature cache (keyed by backbone and content)
      uploads/              pictures of products added through the service
      plots/, evaluation.json

A retrain writes a complete new version folder, then replaces ``run.json`` (one
rename): a reader sees the old version whole or the new one whole. The previous
version's folder is kept until the next publish (a reader that has just read the old
``run.json`` can still open it); older ones, and folders of retrains killed before
they published, are deleted by the next publish.

Runs saved before versions existed (``run.json`` without ``"version"``) keep their
files at the top of the run folder: they load as they are (a *legacy* version), and
the first retrain moves the run to the versioned layout.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from .artifacts import flocked, read_json, write_json
from .errors import FashionrecError

RUN_FILE = "run.json"
VERSIONS = "versions"
SHARED = ("features", "plots", "uploads")  # a run folder's parts that outlive versions
# what a first training killed before it published leaves (still a run folder)
UNPUBLISHED = (VERSIONS, ".run.lock")


class StaleVersion(FashionrecError):
    """A write meant for a model version that is no longer the published one (a retrain
    published a new version meanwhile): redo it against the current version."""


# every file of a model version, by the name the code asks for it with
VERSION_FILES = {
    "head_model": "head.keras",  # the head's network
    "head_state": "head.json",  # its feature scaler, settings, history
    "head_weights": "head_weights.h5",  # the head as NumPy arrays (fashionrec.lean)
    "backbone_ir": "backbone.xml",  # OpenVINO runs: the backbone as OpenVINO IR ...
    "backbone_ir_weights": "backbone.bin",  # ... and its weights
    "embedder": "embedder.json",  # the embedding scaler
    "index": "index.h5",  # the catalog's base rows
    "index_manifest": "index.manifest.json",  # its updates since, and its search graph
    "index_segments": "index.d",  # added rows, graphs
    "index_lock": "index.lock",  # held by a process that writes the catalog
    "split": "split.json",  # catalog runs: which products validate and are held out
    "report": "catalog_report.json",  # catalog runs: every skipped image and why
}


@dataclass(frozen=True)
class Version:
    """The files of one model version (a folder; the run folder itself for a legacy
    run): ``version.index`` is its ``index.h5``, and so on for every key of
    :data:`VERSION_FILES`."""

    folder: Path
    name: str | None  # "versions/<run_id>", None for a legacy run

    def __getattr__(self, key):
        if key in VERSION_FILES:
            return self.folder / VERSION_FILES[key]
        raise AttributeError(key)

    def files(self):
        """Every path this version may own (for deleting a legacy version)."""
        return [self.folder / name for name in VERSION_FILES.values()]


class RunDir:
    """A run folder (see the module doc).

    Example:
        >>> run = RunDir("runs/default")                       # doctest: +SKIP
        >>> run.current().index                                # doctest: +SKIP
        PosixPath('runs/default/versions/3f.../index.h5')
    """

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------ shared files
    @property
    def run_file(self):
        return self.path / RUN_FILE

    @property
    def features(self):
        return self.path / "features"

    @property
    def uploads(self):
        return self.path / "uploads"

    @property
    def evaluation(self):
        return self.path / "evaluation.json"

    def plot(self, name):
        """``RUN_DIR/plots/<name>.png``."""
        return self.path / "plots" / f"{name}.png"

    # ------------------------------------------------------------ the record
    def exists(self):
        return self.run_file.is_file()

    def read(self):
        """The current version's record (``run.json``)."""
        if not self.exists():
            raise FashionrecError(f"no trained run in {self.path}; run `make train` first")
        meta = read_json(self.run_file, "run file")
        if not isinstance(meta, dict) or not meta.get("run_id"):
            raise FashionrecError(f"{self.run_file} is not a fashionrec run")
        return meta

    def run_id(self):
        """The published version's run id (cheap: one small file)."""
        return self.read()["run_id"]

    def stamp(self):
        """Changes whenever ``run.json`` is replaced (``None`` if there is none)."""
        return _stamp(self.run_file)

    def stamps(self):
        """``(record, catalog manifest)`` stamps: they change with every publish and
        every write to the published catalog (two ``stat`` calls and one small read)."""
        run = self.stamp()
        try:
            manifest = _stamp(self.current().index_manifest) if run else None
        except FashionrecError:
            manifest = None
        return run, manifest

    def current(self, meta=None):
        """The published version (of ``meta``, a record already read)."""
        return self.version_of(self.read() if meta is None else meta)

    def version_of(self, meta):
        name = meta.get("version")
        if name is None:
            return Version(self.path, None)
        folder = (self.path / name).resolve()
        if folder.parent != (self.path / VERSIONS).resolve():
            raise FashionrecError(f"{self.run_file} names a version outside {self.path}")
        return Version(self.path / name, name)

    # ------------------------------------------------------------ writing
    def check_target(self, force=False):
        """Refuse to train into a folder that holds something other than a run (its
        files would be overwritten or deleted), unless ``force``."""
        if force or not self.path.exists() or self.exists():
            return
        if not self.path.is_dir():
            raise FashionrecError(f"{self.path} is a file, not a run folder")
        other = sorted(p.name for p in self.path.iterdir()
                       if p.name not in SHARED + UNPUBLISHED)
        if other:
            raise FashionrecError(
                f"{self.path} is not empty and holds no fashionrec run ({', '.join(other[:3])}"
                f"{', ...' if len(other) > 3 else ''}); choose another --run-dir, or --force")

    def new_version(self, run_id):
        """An empty folder for a version being written (published by :meth:`publish`)."""
        folder = self.path / VERSIONS / run_id
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        return Version(folder, f"{VERSIONS}/{run_id}")

    @contextlib.contextmanager
    def locked(self, wait=600.0):
        """The run's own lock (``flock``): one publisher at a time (held while a
        retrain carries the catalog over, writes its version and replaces ``run.json``;
        ``fashionrec index`` waits for it)."""
        with flocked(self.path / ".run.lock", wait,
                     f"{self.path} is being published by another process"):
            yield

    def publish(self, version, meta):
        """Make ``version`` (complete on disk) the published one: ``run.json`` naming
        it replaces the old one atomically; then versions older than the previous one
        are deleted. Call it holding :meth:`locked`."""
        previous = self.current() if self.exists() else None
        write_json(self.run_file, {**meta, "version": version.name})
        keep = {version.folder.resolve()}
        if previous is not None:
            keep.add(previous.folder.resolve())
        self._clean(keep)
        return version

    def rewrite(self, version, meta):
        """Replace the record of the published ``version`` (e.g. a new search choice);
        :class:`StaleVersion` if another version was published since."""
        with self.locked():
            if self.current().folder.resolve() != version.folder.resolve():
                raise StaleVersion(f"{self.path} was retrained meanwhile; nothing was changed")
            write_json(self.run_file, {**meta, "version": version.name})

    def _clean(self, keep):
        versions = self.path / VERSIONS
        if versions.is_dir():
            for folder in versions.iterdir():
                if folder.is_dir() and folder.resolve() not in keep:
                    shutil.rmtree(folder, ignore_errors=True)
        if self.path.resolve() not in keep:  # a legacy version two publishes old
            for path in Version(self.path, None).files():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _stamp(path):
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
