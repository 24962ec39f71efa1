"""Official checkpoints: a path, a URL, or the variant's published URL, verified and cached.

Downloads land in `$XDG_CACHE_HOME/samtriton/checkpoints` (default
`~/.cache/...`), are written under a temporary name and renamed only once
their sha256 matches, so an interrupted or tampered download is never
picked up by a later build.  `SAMTRITON_CHECKPOINT_MIRROR=<base URL>` fetches
`<base URL>/<official file name>` instead of the publisher's URL (air-gapped
clusters usually have an internal artifact store).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from samtriton.variants import ModelVariant

MIRROR_ENV = "SAMTRITON_CHECKPOINT_MIRROR"
_CHUNK = 1 << 20


class CheckpointDownloadError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "samtriton" / "checkpoints"


def is_url(value: str) -> bool:
    return urlparse(str(value)).scheme in ("http", "https")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def official_url(variant: ModelVariant) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return mirror.rstrip("/") + "/" + variant.checkpoint_file
    return variant.checkpoint_url


def _check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise CheckpointDownloadError(f"--checkpoint-sha256 must be 64 hex digits, got {value!r}")
    return value


def _download(url: str, dest: Path, timeout_s: float, log) -> str:
    """Stream `url` into `dest` (a temporary name) and return its sha256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    log(f"  {done / 1e6:.0f} / {total / 1e6:.0f} MB")
                    next_report += 0.1
    except urllib.error.HTTPError as e:
        raise CheckpointDownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise CheckpointDownloadError(
            f"cannot download {url} ({reason}). Without internet access, fetch the file on a machine "
            f"that has it and pass --checkpoint PATH, or point {MIRROR_ENV} at a mirror holding it."
        ) from e
    return digest.hexdigest()


def fetch(url: str, file_name: str, expected_sha256: str | None, timeout_s: float = 60.0,
          cache: Path | None = None, log=print) -> tuple[Path, str]:
    """The cached copy of `url` (downloaded if needed) and its sha256.

    With `expected_sha256`, a cached file must match it (a stale one is
    downloaded again) and so must the download, or nothing is kept.
    """
    expected = _check_sha256(expected_sha256)
    # One folder per URL: two URLs serving files of the same name never share a copy.
    cache = (cache or cache_dir()) / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache / file_name
    if target.is_file():
        actual = sha256_of(target)
        if expected is None or actual == expected:
            log(f"using cached {target}")
            return target, actual
        log(f"cached {target} has sha256 {actual}, expected {expected}: downloading again")
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading {url}")
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{file_name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        actual = _download(url, tmp, timeout_s, log)
        if expected is not None and actual != expected:
            raise CheckpointDownloadError(
                f"sha256 mismatch for {url}: got {actual}, expected {expected}. The file is corrupt or "
                "not the one published; nothing was kept. Retry, check the URL, or pass a file you "
                "trust with --checkpoint PATH (and --checkpoint-sha256 if it differs)."
            )
        shutil.move(str(tmp), target)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"saved {target} (sha256 {actual})")
    return target, actual


def resolve_checkpoint(variant: ModelVariant, checkpoint: str | None, sha256: str | None = None,
                       cache: Path | None = None, log=print) -> Path:
    """A local checkpoint file for `variant` from a path, a URL or (None) the official URL."""
    expected = _check_sha256(sha256)
    if checkpoint is not None and not is_url(checkpoint):
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointDownloadError(f"checkpoint file {path} does not exist")
        if expected is not None and sha256_of(path) != expected:
            raise CheckpointDownloadError(f"{path} has sha256 {sha256_of(path)}, expected {expected}")
        return path
    if checkpoint is None:
        url = official_url(variant)
        expected = expected or variant.checkpoint_sha256
        if expected is None:
            raise CheckpointDownloadError(
                f"samtriton records no sha256 for {variant.checkpoint_file} ({variant.name}), so it will not "
                f"download it unverified. Pass --checkpoint-sha256 HEX (the publisher's checksum), or "
                f"download {url} yourself and pass --checkpoint PATH."
            )
    else:
        url = checkpoint
        if expected is None and url in (variant.checkpoint_url, official_url(variant)):
            expected = variant.checkpoint_sha256
    file_name = Path(urlparse(url).path).name or variant.checkpoint_file
    path, actual = fetch(url, file_name, expected, cache=cache, log=log)
    if expected is None:
        log(f"warning: {url} was not verified (no sha256 given); its sha256 is {actual}")
    return path
