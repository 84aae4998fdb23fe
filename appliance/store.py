"""The model store: versioned folders of graphs, calibration and manifest, switched atomically.

Layout::

    STORE/CURRENT                 name of the active version (replaced with os.replace)
    STORE/versions/<id>/manifest.json
    STORE/versions/<id>/forward.onnx, inverse.onnx, calibration.npz, privacy_index.npy,
                                  latent_prior.npz, lead_check.npz (when fitted)

Serving reads ``CURRENT`` once, so it never sees a half-written version. This module does not
import PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import ModelStoreError
from appliance.manifest_values import check_manifest_values

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST_FILE = "manifest.json"
# A version name is a time stamp and a hash prefix, far shorter than this.
MAX_POINTER_BYTES = 256
MANIFEST_FORMAT = 1
# Prefix of a version folder that is still being written, and the file in it that names the
# host and process writing it.
PARTIAL_PREFIX = ".partial-"
OWNER_FILE = ".owner"
# A partial folder whose writer cannot be checked, because it has no owner file or was written
# on another host (an earlier container, say), is removed once it is this old.
UNOWNED_PARTIAL_AGE_S = 24 * 3600.0
# Manifest sections that shape what the served model returns, besides the files' bytes. The
# model id is a hash of these and of every file's SHA-256; the export time and the training
# history are left out, so two exports of the same weights with the same calibration, prior and
# settings share an id.
MODEL_ID_SECTIONS = ("data", "classes", "classes_known", "model", "gate", "privacy")

logger = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    """Return the SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One verified version of the store: its folder and parsed manifest.

    Attributes:
        path: The version folder.
        manifest: The parsed manifest.
        newly_published: False when a publication found the same model id already current
            and kept that version instead of adding a copy.
    """

    path: Path
    manifest: dict[str, Any]
    newly_published: bool = True

    def file(self, key: str) -> Path:
        """Return the path of a file the manifest lists under ``files``."""
        return self.path / self.manifest["files"][key]["name"]


def new_version_dir(store: Path) -> Path:
    """Create and return an empty folder for a version that is being written.

    Partial folders left by an export that was killed are removed first, because they can
    hold a privacy index of training beats that no version uses.
    """
    remove_abandoned_partials(store)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = store / VERSIONS_DIR / f"{PARTIAL_PREFIX}{stamp}"
    path.mkdir(parents=True, exist_ok=False)
    (path / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # the process exists under another user
    return True


def _abandoned(partial: Path) -> bool:
    """Return whether the export that was writing ``partial`` ended without publishing it."""
    try:
        host, pid_text = (partial / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except FileNotFoundError:
        return time.time() - partial.stat().st_mtime > UNOWNED_PARTIAL_AGE_S
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        # Each container gets a new host name, so a folder left by a killed export in an
        # earlier container would otherwise stay, privacy index of training beats included.
        return time.time() - partial.stat().st_mtime > UNOWNED_PARTIAL_AGE_S
    return not _process_alive(pid)


def remove_abandoned_partials(store: Path) -> list[Path]:
    """Remove the partial version folders of exports that ended without publishing.

    Returns:
        The folders removed.
    """
    versions = store / VERSIONS_DIR
    if not versions.is_dir():
        return []
    removed = []
    for partial in sorted(versions.glob(f"{PARTIAL_PREFIX}*")):
        if partial.is_dir() and _abandoned(partial):
            shutil.rmtree(partial, ignore_errors=True)
            logger.warning("removed abandoned partial version path=%s", partial)
            removed.append(partial)
    return removed


def model_id_of(manifest: dict[str, Any]) -> str:
    """Return the id of the model a manifest describes: 16 hex digits of a SHA-256.

    Arguments:
        manifest: Manifest whose ``files`` entries carry their ``sha256``.
    """
    identity = {
        "files": {key: entry["sha256"] for key, entry in manifest["files"].items()},
        **{key: manifest.get(key) for key in MODEL_ID_SECTIONS},
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def publish_version(store: Path, partial: Path, manifest: dict[str, Any]) -> ModelVersion:
    """Hash the files, write the manifest and make the version current atomically.

    Arguments:
        store: Store folder.
        partial: Folder from ``new_version_dir`` holding every file the manifest lists.
        manifest: Manifest without hashes; ``files`` maps keys to ``{"name": ...}``.
    """
    for entry in manifest["files"].values():
        entry["sha256"] = sha256_of(partial / entry["name"])
    forward_hash = manifest["files"]["forward_graph"]["sha256"]
    version_id = f"{partial.name.removeprefix(PARTIAL_PREFIX)}-{forward_hash[:12]}"
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_id": model_id_of(manifest),
        "version": version_id,
        **manifest,
    }
    current = _current_version_if_model(store, str(manifest["model_id"]))
    if current is not None:
        # A resumed run whose best weights did not change exports the same model again. A
        # second version would only add another copy of the training beats' privacy index.
        discard_partial(partial)
        logger.info(
            "export unchanged model_id=%s kept_version=%s; nothing new was published",
            manifest["model_id"],
            current.path.name,
        )
        return current
    (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    (partial / OWNER_FILE).unlink(missing_ok=True)
    final = store / VERSIONS_DIR / version_id
    os.replace(partial, final)
    pointer = store / f".{CURRENT_FILE}.tmp"
    pointer.write_text(version_id + "\n")
    os.replace(pointer, store / CURRENT_FILE)
    return ModelVersion(path=final, manifest=manifest)


def _current_version_if_model(store: Path, model_id: str) -> ModelVersion | None:
    """Return the store's current version if it can be served and contains ``model_id``.

    A current version that fails a serving check gets the new export instead, which is the fix
    its error message gives.
    """
    try:
        current = load_current(store)
        require_served_files(current)
    except ModelStoreError:
        return None
    if current.manifest.get("model_id") != model_id:
        return None
    return ModelVersion(path=current.path, manifest=current.manifest, newly_published=False)


def discard_partial(partial: Path) -> None:
    """Remove a version folder that was never published."""
    shutil.rmtree(partial, ignore_errors=True)


def current_version_id(store: Path) -> str:
    """Return the id of the store's current version, as its CURRENT file names it.

    Raises:
        ModelStoreError: If the store has no CURRENT file, naming a nearby folder that has one.
    """
    pointer = store / CURRENT_FILE
    if not store.is_dir():
        problem = "is not a folder" if store.exists() else "does not exist"
        raise ModelStoreError(
            f"model store {store} {problem}; check --store, or run `python -m appliance train "
            f"--store {store}` to create one"
        )
    if not pointer.exists():
        # `python -m appliance run --out DIR` keeps its store in DIR/model-store, and a path
        # inside a store (its versions folder or one version) has the store above it.
        for nearby in (store / "model-store", store.parent, store.parent.parent):
            if nearby != store and (nearby / CURRENT_FILE).exists():
                raise ModelStoreError(
                    f"model store {store} has no trained model ({pointer} is missing), but "
                    f"{nearby} has one; pass --store {shlex.quote(str(nearby))}"
                )
        raise ModelStoreError(
            f"model store {store} has no trained model ({pointer} is missing); run "
            f"`python -m appliance train --store {shlex.quote(str(store))}` first"
        )
    try:
        if not stat.S_ISREG(pointer.lstat().st_mode):
            raise ModelStoreError(
                f"{pointer} is not a regular file (a link or a device); publishing writes it as "
                f"a file that names a folder in {store / VERSIONS_DIR}, so write that name into "
                "a plain file, or retrain"
            )
        with pointer.open("rb") as handle:
            raw = handle.read(MAX_POINTER_BYTES + 1)
        if len(raw) > MAX_POINTER_BYTES:
            raise ModelStoreError(
                f"{pointer} contains more than {MAX_POINTER_BYTES} bytes, so it is not a version "
                f"name; write the name of a folder in {store / VERSIONS_DIR} into it, or retrain"
            )
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ModelStoreError(
            f"{pointer} is not a version name in UTF-8 text ({exc.reason}); write the name of "
            f"a folder in {store / VERSIONS_DIR} into it, or retrain"
        ) from exc
    except OSError as exc:
        raise ModelStoreError(
            f"{pointer} cannot be read ({exc.strerror or exc}); check the store's permissions"
        ) from exc


def load_current(store: Path) -> ModelVersion:
    """Load the current version and verify every file against the manifest's SHA-256.

    Raises:
        ModelStoreError: If the store, the manifest or a file is missing, or a hash differs.
    """
    version = current_version_id(store)
    path = store / VERSIONS_DIR / version
    manifest_path = path / MANIFEST_FILE
    if version.startswith(PARTIAL_PREFIX):
        raise ModelStoreError(
            f"{store / CURRENT_FILE} names {version!r}, the folder of an export that never "
            "finished; write the name of a published version into CURRENT, or export again"
        )
    if path.is_symlink():
        raise ModelStoreError(
            f"{path} is a symbolic link; a version folder contains the files export wrote, so "
            "copy the version into the store instead of linking it"
        )
    if not version or "/" in version or version in (".", "..") or not path.is_dir():
        present = sorted(
            entry.name
            for entry in (store / VERSIONS_DIR).glob("*")
            if entry.is_dir() and not entry.name.startswith(PARTIAL_PREFIX)
        )
        value_text = version if len(version) <= 80 else f"{version[:80]}..."
        raise ModelStoreError(
            f"{store / CURRENT_FILE} names version {value_text!r}, which is not in "
            f"{store / VERSIONS_DIR}; versions present: {', '.join(present) or 'none'}. Write "
            "one of them into CURRENT, or retrain"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError covers invalid JSON and text that is not UTF-8.
        raise ModelStoreError(f"manifest {manifest_path} cannot be read: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelStoreError(
            f"manifest {manifest_path} has format {found!r}, expected "
            f"{MANIFEST_FORMAT}; retrain with this version of the appliance"
        )
    files = _checked_file_entries(manifest, manifest_path)
    for key, entry in files.items():
        file_path = path / entry["name"]
        _check_regular_file(file_path, key)
        actual = sha256_of(file_path)
        if actual != entry["sha256"]:
            raise ModelStoreError(
                f"model store file {file_path} ({key}) has SHA-256 {actual[:16]}..., the "
                f"manifest says {entry['sha256'][:16]}...; the store was modified, retrain"
            )
    # The id covers the file hashes and every manifest section that shapes the replies, so an
    # edit to the gate, the privacy threshold or the data contract shows here. It is a
    # checksum, not a signature: it catches damage and edits, not a writer who recomputes it.
    expected_id = model_id_of(manifest)
    if manifest.get("model_id") != expected_id:
        raise ModelStoreError(
            f"manifest {manifest_path} gives model id {manifest.get('model_id')!r}, but its "
            f"files and settings give {expected_id}: the manifest was edited after the model "
            "was published. Restore it, or publish the model again with `python -m appliance "
            "export` or `train`"
        )
    return ModelVersion(path=path, manifest=manifest)


# Files a served version must list. The lead check and the latent prior are optional, as
# models exported before they existed are still served.
SERVED_FILES = ("forward_graph", "inverse_graph", "calibration", "privacy_index")


def require_served_files(version: ModelVersion) -> None:
    """Raise ModelStoreError unless the version lists every file and value that serving needs."""
    missing = [key for key in SERVED_FILES if key not in version.manifest["files"]]
    if missing:
        raise ModelStoreError(
            f"model version {version.path} lists no {', '.join(missing)} file, so it cannot "
            "be served; publish it again with `python -m appliance export` or `train`"
        )
    check_manifest_values(version.manifest, version.path / MANIFEST_FILE)


def _checked_file_entries(manifest: dict[str, Any], manifest_path: Path) -> dict[str, Any]:
    """Return the manifest's ``files`` after checking that each entry is a plain file name.

    Raises:
        ModelStoreError: If ``files`` is missing or malformed, or names a path outside the
            version folder.
    """
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ModelStoreError(
            f"manifest {manifest_path} has no 'files' table; the version is damaged, retrain"
        )
    for key, entry in files.items():
        name = entry.get("name") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(digest, str):
            raise ModelStoreError(
                f"manifest {manifest_path} entry files.{key} needs a 'name' and a 'sha256' "
                "string; the version is damaged, retrain"
            )
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ModelStoreError(
                f"manifest {manifest_path} entry files.{key} names {name!r}, which is not a "
                "file name inside the version folder; the version is damaged, retrain"
            )
    return files


def _check_regular_file(file_path: Path, key: str) -> None:
    """Raise ModelStoreError unless ``file_path`` is a regular file and not a link."""
    try:
        mode = file_path.lstat().st_mode
    except FileNotFoundError:
        raise ModelStoreError(
            f"model store file {file_path} ({key}) is missing; retrain"
        ) from None
    except OSError as exc:
        raise ModelStoreError(
            f"model store file {file_path} ({key}) cannot be read ({exc.strerror}); check the "
            "store's permissions"
        ) from exc
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise ModelStoreError(
            f"model store file {file_path} ({key}) is {kind}; a version contains only the files "
            "export wrote, so retrain or restore the version"
        )
