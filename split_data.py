"""Fetch TensorFlow's flower_photos and split it 9:1 into train/ and val/ for the train scripts.

    $ python split_data.py                       # download, verify, extract, split
    $ python split_data.py --sample              # the project's 150 photos: no network
    $ python split_data.py --source ~/Downloads/flower_photos.tgz
    $ python split_data.py --source my_photos/ --val-ratio 0.2 --out data/my_data
    $ python split_data.py --test-ratio 0.1      # train/val/test, 8:1:1

A source is a folder with one sub-folder per class (searched recursively for images) or an
archive of such a folder (.tgz, .tar.gz, .tar, .zip). The split is stratified and the same on
every machine: each class's files are sorted by name, then shuffled with a seeded generator,
and int(n * val_ratio) of them go to val (then, with --test-ratio, int(n * test_ratio) to a
test/ folder that training never reads). It is built in a temporary folder beside --out and
swapped in at the end, so an interrupted run never leaves half a split behind.
"""

import signal

if __name__ == "__main__":  # Ctrl-C while the modules load: stop, without a traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import NoReturn

from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"
FLOWERS_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
)
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
SAMPLE_DIR = DATA_DIR / "flower_sample"  # 30 photos per class of flower_photos, committed
# What the train scripts read (utils.IMAGE_SUFFIXES): a file they would skip is not counted.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")
MANIFEST = "split.json"
JOURNAL = "swap.json"  # in the temporary folder while the split is swapped in: what went where
MAX_ASPECT = 100  # longer side / shorter side, as the train scripts' utils.MAX_ASPECT
SUBSETS = ("train", "val", "test")


class SplitError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def download(url: str, dest: Path, sha256: str) -> None:
    """Download url to dest, resuming a partial download, and verify its sha256."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "split_data.py"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the partial file already holds every byte; verify it below
            raise SplitError(f"cannot download {url}: HTTP {e.code} {e.reason}") from e
        response = None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SplitError(
            f"cannot download {url} ({reason}). Without network: python split_data.py --sample "
            f"splits the project's 150 photos for a first look, or fetch the archive elsewhere "
            f"and run: python split_data.py --source PATH/TO/{dest.name}"
        ) from e
    if response is not None:
        with response:
            resumed = response.status == 206
            if offset and not resumed:
                offset = 0  # the server ignored the Range header: start again from scratch
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length else None
            action = "resuming" if resumed else "downloading"
            print(f"{action} {url} -> {dest}")
            try:
                with (
                    open(part, "ab" if resumed else "wb") as f,
                    tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024
                    ) as bar,
                ):
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            except OSError as e:
                raise SplitError(
                    f"download of {url} broke off ({e}); run again to resume it"
                ) from e
    digest = file_sha256(part)
    if digest != sha256:
        part.unlink()
        raise SplitError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the file "
            f"was deleted, run again to download it anew (or pass --sha256 for a different file)"
        )
    part.replace(dest)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def check_member_name(archive: Path, name: str) -> None:
    """Refuse a member name that would land outside the folder it is extracted to."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise SplitError(f"{archive}: refusing unsafe path {name!r} in the archive")


def extract(archive: Path, dest: Path) -> None:
    """Extract archive into the existing folder dest, refusing anything unsafe up front.

    Only regular files and folders are accepted: links, devices and paths that climb out of
    dest stop the extraction before a single byte is written.
    """
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
                for info in infos:  # (__MACOSX/: the resource forks a Mac adds to a zip)
                    check_member_name(archive, info.filename)
                    mode = info.external_attr >> 16
                    kind = stat.S_IFMT(mode)  # 0: no type bits (zipfile.writestr): a file
                    if kind and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise SplitError(
                            f"{archive}: refusing {info.filename!r}, a link or special file"
                        )
                zf.extractall(dest, infos)
        else:
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    check_member_name(archive, member.name)
                    if not (member.isfile() or member.isdir()):
                        raise SplitError(
                            f"{archive}: refusing {member.name!r}, a link or special file"
                        )
                # The "data" filter re-checks the same rules where Python has it (3.8.17+).
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:
                    tf.extractall(dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SplitError(f"no space left on the disk of {dest} to extract {archive}") from e
        raise SplitError(
            f"cannot read archive {archive} ({str(e).splitlines()[0].rstrip(':')}); "
            f"is it complete and a .tgz/.tar/.zip?"
        ) from e


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_dataset_root(folder: Path) -> Path:
    """Go down through single wrapper folders (flower_photos.tgz holds flower_photos/...)."""
    while True:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1 and any(p.is_dir() for p in subdirs[0].iterdir()):
            folder = subdirs[0]
        else:
            return folder


def list_classes(root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Map each class folder under root to its files, sorted by relative path, found as the
    train scripts find photos (utils.find_photos: hidden files and folders skipped, a link to a
    folder not followed); what cannot be a photo there is named, with why."""
    classes, skipped = {}, []

    def skip(path: str, why: str) -> None:
        skipped.append(f"{Path(path).relative_to(root).as_posix()}: {why}")

    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name[0] != "."):
        files = []
        walk = os.walk(class_dir, onerror=lambda e: skip(e.filename, f"{e.strerror}, not read"))
        for parent, dirs, names in walk:
            for d in [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
                skip(os.path.join(parent, d), "a link to a folder, not followed")
            dirs[:] = [
                d for d in dirs if d[0] != "." and not os.path.islink(os.path.join(parent, d))
            ]
            for path in (Path(parent, name) for name in names if name[0] != "."):
                if path.is_file():
                    files.append(path)
                else:
                    skip(path, "not a file (a dangling link, a FIFO?)")
        classes[class_dir.name] = sorted(files, key=lambda p: p.relative_to(class_dir).as_posix())
    return classes, skipped


def image_problem(path: Path) -> str | None:
    """Return why path is not a usable image, or None when it decodes."""
    if path.suffix.lower() not in IMG_EXTENSIONS:
        return "not an image type the train scripts read"
    try:
        with Image.open(path) as img:
            if max(img.size) > MAX_ASPECT * min(img.size):
                return f"{img.width} x {img.height} pixels: too thin to be a photo"
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            img.load()
    except Image.DecompressionBombError:
        return "too many pixels (Pillow's decompression-bomb limit)"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be decoded ({e})"
    return None


def check_images(classes: dict[str, list[Path]], root: Path) -> tuple[dict, list[str]]:
    """Decode every candidate file; return the good files per class and the skipped ones."""
    files = [p for paths in classes.values() for p in paths]
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        problems = list(
            tqdm(
                pool.map(image_problem, files),
                total=len(files),
                desc="checking images",
                unit="img",
                disable=len(files) < 500,
            )
        )
    bad = dict(zip(files, problems, strict=True))
    good = {name: [p for p in paths if bad[p] is None] for name, paths in classes.items()}
    skipped = [f"{p.relative_to(root).as_posix()}: {bad[p]}" for p in files if bad[p]]
    return good, skipped


def split_class(name: str, files: list[Path], ratios: dict[str, float], seed: int) -> dict:
    """Sorted files, shuffled with a generator seeded by (seed, class name); the first
    int(n * val ratio) go to val, the next int(n * test ratio) to test, the rest to train."""
    files = list(files)
    random.Random(f"{seed}:{name}").shuffle(files)
    n_val, n_test = (share(len(files), ratios[subset]) for subset in ("val", "test"))
    subsets = {"train": files[n_val + n_test :], "val": files[:n_val]}
    if ratios["test"]:
        subsets["test"] = files[n_val : n_val + n_test]
    return subsets


def share(n: int, ratio: float) -> int:
    # The small epsilon keeps int() from flooring a product such as 0.1 * n just below n / 10.
    return math.floor(n * ratio + 1e-9)


def place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, dst) if link else shutil.copyfile(src, dst)


def can_link(src: Path, folder: Path) -> bool:
    """Whether files can be hard-linked from src's file system into folder; if not, say so."""
    try:
        os.link(src, folder / ".link-probe")
        (folder / ".link-probe").unlink()
        return True
    except OSError as e:
        print(f"note: --link: {e.strerror} from {src.parent} to {folder}: copying instead")
        return False


def write_split(root, classes, out, ratios, seed, link, manifest) -> None:
    """Build train/, val/ (test/) and the manifest in a temporary sibling of out, then swap them in.

    Whatever fails (a full disk, Ctrl-C, a file that cannot be read), out keeps its previous
    split whole: either every entry is swapped in or every one is put back. Only a split that
    split_data.py made, unchanged since, is replaced; anything else in out is the user's.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SplitError(f"--out {out} cannot be created ({e.strerror or e})") from e
    found = [entry for entry in (*SUBSETS, MANIFEST) if (out / entry).exists()]
    if found and not own_split(out):
        found = ", ".join(f"{entry}/" if "." not in entry else entry for entry in found)
        raise SplitError(
            f"{out}: {found} not made by split_data.py (or changed since); move them away or "
            f"choose another --out"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-split-{os.getpid()}-", dir=out.parent))
    try:
        link = link and can_link(next(iter(classes.values()))[0], tmp)
        for name, files in classes.items():
            for subset, chosen in split_class(name, files, ratios, seed).items():
                for src in chosen:
                    place(src, tmp / subset / name / src.relative_to(root / name), link)
        manifest["files_sha256"] = files_digest(tmp)  # what re-splitting checks is unchanged
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = tmp / "previous"
        old.mkdir()
        with ctrl_c_held(out):  # from here a Ctrl-C waits until the split is whole and tidy
            swap_in(tmp, old, out)
            shutil.rmtree(tmp)
    except OSError as e:
        raise SplitError(f"{write_problem(e, out)}; {out} was left as it was") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(tmp: Path, old: Path, out: Path) -> None:
    """Move out's split into old and tmp's into out. The journal written first says which
    entries each had, so that a failure here, or a kill (the next run finds the journal),
    puts out back as it was at whatever step the swap stopped: see roll_back."""
    entries = (*SUBSETS, MANIFEST)  # a test/ the new split lacks goes too
    had = [entry for entry in entries if os.path.lexists(out / entry)]
    new = [entry for entry in entries if (tmp / entry).exists()]
    (tmp / JOURNAL).write_text(json.dumps({"had": had, "new": new}))
    try:
        for entry in entries:
            if entry in had:
                (out / entry).replace(old / entry)
            if entry in new:
                (tmp / entry).replace(out / entry)
    except BaseException:
        roll_back(tmp, out)
        raise
    (tmp / JOURNAL).unlink()  # done: from here tmp holds only the previous split, to delete


def roll_back(tmp: Path, out: Path) -> None:
    """Undo the swap the journal in tmp describes: an entry of the new split that was moved
    into out goes back to tmp, an entry of the previous split moved to tmp/previous returns."""
    try:
        journal = json.loads((tmp / JOURNAL).read_text())
    except (OSError, ValueError):  # none, or cut short while written: nothing was moved yet
        return
    for entry in (*SUBSETS, MANIFEST):
        if entry in journal["new"] and not os.path.lexists(tmp / entry):
            (out / entry).replace(tmp / entry)
        if entry in journal["had"] and os.path.lexists(tmp / "previous" / entry):
            (tmp / "previous" / entry).replace(out / entry)
    (tmp / JOURNAL).unlink()


@contextlib.contextmanager
def ctrl_c_held(out: Path):
    """Hold a Ctrl-C until the block is done; then exit 130, saying the new split is in place."""
    pressed = []
    handler = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if pressed:
        exit_interrupted(f"\nsplit_data.py: interrupted; the new split is whole in {out}")


def own_split(out: Path) -> bool:
    """Whether out's train/, val/ (test/) are the split its split.json describes: the digest of
    every file's name and bytes there (hidden files included) is the manifest's, so an edit,
    a crop or an added file makes the split the user's. A manifest of an earlier version has
    only the digest of the (not hidden) file names."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        digest, content = manifest["split_sha256"], manifest.get("files_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if content is not None:
        return files_digest(out) == content
    entries = []
    for subset in SUBSETS:
        files = (out / subset).rglob("*") if (out / subset).is_dir() else []
        for p in (p for p in files if p.is_file() and not is_hidden(p, out / subset)):
            name, *rest = p.relative_to(out / subset).parts
            entries.append((name, subset, PurePosixPath(*rest)))
    return split_digest(entries) == digest


def files_digest(folder: Path) -> str | None:
    """sha256 of the names and bytes of everything in folder's train/, val/ (test/), hidden
    files included; None if something there is neither a file nor a folder (a link)."""
    h = hashlib.sha256()
    for subset in SUBSETS:
        for p in sorted((folder / subset).rglob("*")):
            name = p.relative_to(folder).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                return None
            h.update(f"{name}/\n".encode() if p.is_dir() else f"{name} {file_sha256(p)}\n".encode())
    return h.hexdigest()


def split_digest(entries) -> str:
    """sha256 of the split's file names, each (class, subset, path in the class folder)."""
    h = hashlib.sha256()
    for name, subset, path in sorted(entries, key=lambda e: (e[0], SUBSETS.index(e[1]), e[2])):
        h.update(f"{subset}/{name}/{path.as_posix()}\n".encode())
    return h.hexdigest()


def remove_leftovers(out: Path) -> None:
    """Delete the temporary folders that an earlier run into out left behind (killed, or
    interrupted while cleaning up), after putting back a split its kill left half swapped;
    those of a run still going on stay, and so do those of any other --out (`X-split`)."""
    own = re.compile(rf"\.{re.escape(out.name)}-(?:(?:split|extract)-(\d+)-[^-]+|split-\w{{8}})")
    for tmp in out.parent.iterdir():
        match = own.fullmatch(tmp.name)
        if not match or not tmp.is_dir() or match[1] and running(match[1]):
            continue
        if (tmp / JOURNAL).exists():
            roll_back(tmp, out)
            print(f"note: put back the split in {out} that a killed run was replacing")
        shutil.rmtree(tmp, ignore_errors=True)


def running(pid: str) -> bool:
    """Whether another process pid runs (where that cannot be told, as on Windows: True)."""
    try:
        if int(pid) <= 0:  # os.kill would signal a process group
            return False
        os.kill(int(pid), 0) if os.name == "posix" else None  # signal 0: only a check
        return int(pid) != os.getpid()
    except ProcessLookupError:  # no such process
        return False
    except (ValueError, PermissionError):  # no number yet (being written); another user's
        return True


def write_problem(e: OSError, out: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk of {out} while writing the split"
    return f"cannot write the split beside {out} ({e.strerror or e}: {e.filename})"


def build_manifest(root, classes, ratios, seed, source, skipped) -> dict:
    counts, entries = {}, []
    for name, files in classes.items():
        subsets = split_class(name, files, ratios, seed)
        counts[name] = {subset: len(chosen) for subset, chosen in subsets.items()}
        for subset, chosen in subsets.items():
            entries += [
                (name, subset, PurePosixPath(*p.relative_to(root / name).parts)) for p in chosen
            ]
    totals = {sub: sum(c.get(sub, 0) for c in counts.values()) for sub in SUBSETS}
    return {
        "source": str(source),
        "seed": seed,
        "val_ratio": ratios["val"],
        "test_ratio": ratios["test"],
        "classes": counts,
        **totals,
        "skipped": skipped,
        "split_sha256": split_digest(entries),
    }


def split(source: Path, out: Path, ratios: dict, seed: int, link: bool, label: str) -> None:
    root = find_dataset_root(source)
    classes, unlisted = list_classes(root)
    if not classes:
        raise SplitError(f"{label} holds no class folders; expected one sub-folder of images each")
    if (root / MANIFEST).is_file() or {"train", "val"} <= set(classes):
        raise SplitError(f"{label} is a split (train/, val/): pass the photos it was made from")
    classes, skipped = check_images(classes, root)
    skipped = unlisted + skipped
    if skipped:
        print(f"warning: skipped {len(skipped)} file(s) or folder(s), not usable images:")
        for line in skipped:
            print(f"  {line}")
    least = 3 if ratios["test"] else 2  # an image in each subset
    for name, files in classes.items():
        if len(files) < least:
            have = f"class {name!r} of {label} has {len(files)} usable image(s), a split needs"
            raise SplitError(f"{have} {least}: add images, or remove the class folder")
        for subset, chosen in split_class(name, files, ratios, seed).items():
            if not chosen:
                given = f"--val-ratio {ratios['val']}"
                if ratios["test"]:
                    given += f" and --test-ratio {ratios['test']}"
                enough = math.ceil(1000 / len(files)) / 1000  # a share that gives it one image
                change = f"pass --{subset}-ratio {enough} or more" if subset != "train" else ""
                raise SplitError(
                    f"class {name!r} has only {len(files)} image(s): with {given} none would "
                    f"go to {subset}; add images or {change or 'lower them'}"
                )
    manifest = build_manifest(root, classes, ratios, seed, label, skipped)
    before = out / MANIFEST
    try:
        previous = json.loads(before.read_text()).get("split_sha256") if before.exists() else None
    except (OSError, ValueError):
        previous = None
    write_split(root, classes, out, ratios, seed, link, manifest)

    width = max(len(name) for name in classes) + 2
    columns = [sub for sub in SUBSETS if manifest[sub]]
    print(f"{'class':<{width}}" + "".join(f"{sub:>7}" for sub in columns))
    for name, c in manifest["classes"].items():
        print(f"{name:<{width}}" + "".join(f"{c[sub]:>7}" for sub in columns))
    print(f"{'total':<{width}}" + "".join(f"{manifest[sub]:>7}" for sub in columns))
    sameness = " (the same split as before)" if previous == manifest["split_sha256"] else ""
    print(f"split {manifest['split_sha256'][:12]}{sameness} written to {out}")


def fetch_default(url: str, sha256: str) -> Path:
    """Download and extract the archive unless its extracted folder is already there."""
    extracted = DATA_DIR / "flower_data" / "flower_photos"
    if extracted.is_dir():
        return extracted
    DATA_DIR.mkdir(exist_ok=True)
    name = Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1])).name or "flower_photos.tgz"
    archive = DATA_DIR / name
    if not archive.exists():
        download(url, archive, sha256)
    extracted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".flower_photos-", dir=extracted.parent))
    try:
        print(f"extracting {archive}")
        extract(archive, tmp)
        find_dataset_root(tmp).replace(extracted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return extracted


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--source",
        type=Path,
        default=None,
        help="folder of class sub-folders, or a .tgz/.tar.gz/.tar/.zip of one (default: "
        "download flower_photos into data/ unless data/flower_data/flower_photos exists)",
    )
    source.add_argument(
        "--sample",
        action="store_const",
        const=SAMPLE_DIR,
        dest="source",
        help="split the project's own 150 photos (data/flower_sample/, 30 per class) instead: "
        "no network, a first look in a minute",
    )
    parser.add_argument(
        "--url", default=FLOWERS_URL, help=f"download address (default: {FLOWERS_URL})"
    )
    parser.add_argument(
        "--sha256",
        default=FLOWERS_SHA256,
        help="expected sha256 of the file at --url (default: flower_photos.tgz's)",
    )
    parser.add_argument(
        "--val-ratio",
        type=float,
        default=0.1,
        help="share of each class that goes to val (default: 0.1)",
    )
    parser.add_argument(
        "--test-ratio",
        type=float,
        default=0.0,
        help="share of each class that goes to test/, a held-out folder that training never "
        "reads: score it with predict.py --eval (default: 0, no test/)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: 0)")
    parser.add_argument(
        "--link",
        action="store_true",
        help="hard-link files instead of copying them where the file system allows: no space "
        "taken, but an edit of a split photo edits the source photo too (default: copy)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DATA_DIR / "flower_data",
        help="folder that receives train/, val/ and split.json (default: data/flower_data)",
    )
    return parser


def prepare_out(out: Path, source: Path | None) -> None:
    """--out must be a folder that can be made, outside the photos it is split from.

    Checked before any work, without creating anything: a failed run leaves no empty folder.
    """
    if source is not None and out.is_relative_to(source):
        where = "is --source itself" if out == source else f"is inside --source {source}"
        raise SplitError(
            f"--out {out} {where}: the next run would take train/ and val/ for classes; "
            f"choose an --out outside the source"
        )
    for entry in (out / name for name in (*SUBSETS, MANIFEST) if source is not None):
        if source.is_relative_to(entry):
            part = f"part of {entry}, which the split replaces"
            raise SplitError(f"--source {source} is {part}: pass the photos it was made from")
    for folder in (out, out.parent):  # out takes the split, its parent the temporary folder
        above = folder
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            where = "is a file" if above == out else f"cannot be created: {above} is a file"
            raise SplitError(f"--out {out} {where}; choose a folder")
        try:
            with tempfile.TemporaryFile(dir=above):
                pass
        except OSError as e:
            what = "cannot be written" if out.exists() else "cannot be created"
            raise SplitError(
                f"--out {out} {what} ({e.strerror or e}: {above}); choose a folder you can write"
            ) from e


@contextlib.contextmanager
def holding(out: Path):
    """Make out's parent if need be and hold out for this run: a second split_data.py into it
    is refused while this one runs. A failed run removes the empty folders it made."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.split-lock"
    if lock.is_file():  # as train.py's utils.prepare_output_dir
        pid = lock.read_text().strip()
        young = time.time() - lock.stat().st_mtime < 10  # an empty one: its number comes next
        if not (running(pid) if pid else young):
            lock.unlink()  # left by a run that was killed
    try:
        with open(lock, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        raise SplitError(
            f"another split_data.py (process {lock.read_text().strip()[:10]}) writes to {out}; "
            f"wait for it, or delete {lock} if none runs"
        ) from None
    try:
        remove_leftovers(out)
        yield
    except BaseException:
        lock.unlink(missing_ok=True)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise
    finally:
        lock.unlink(missing_ok=True)


def resolved(path: Path, flag: str) -> Path:
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError) as e:  # before Python 3.13: RuntimeError("Symlink loop")
        raise SplitError(f"{flag} {path} is a loop of symbolic links; fix it") from e


def main(args: argparse.Namespace) -> None:
    if not 0 < args.val_ratio < 1:
        raise SplitError(f"--val-ratio must be between 0 and 1, got {args.val_ratio}")
    if not (0 <= args.test_ratio < 1 and args.val_ratio + args.test_ratio < 1):
        raise SplitError(
            f"--test-ratio must be 0 or more, with --val-ratio + --test-ratio below 1, got "
            f"{args.test_ratio}"
        )
    ratios = {"val": args.val_ratio, "test": args.test_ratio}
    out = resolved(args.out, "--out")
    if args.source is None:
        source = fetch_default(args.url, args.sha256.lower())
        prepare_out(out, None)
        with holding(out):
            split(source, out, ratios, args.seed, args.link, args.url)
        return
    source = resolved(args.source, "--source")
    if not source.exists():
        raise SplitError(f"--source {args.source} does not exist")
    if not (source.is_dir() or is_archive(source)):
        raise SplitError(
            f"--source {args.source} is neither a folder nor a .tgz/.tar.gz/.tar/.zip archive"
        )
    prepare_out(out, source)
    with holding(out):
        if source.is_dir():
            split(source, out, ratios, args.seed, args.link, source)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-extract-{os.getpid()}-", dir=out.parent))
        try:
            print(f"extracting {source}")
            extract(source, tmp)
            split(tmp, out, ratios, args.seed, args.link, source)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def exit_interrupted(message: str = "") -> NoReturn:
    """Say message, exit with 130 (Ctrl-C's code), no traceback from a cleanup cut short."""
    print(message, file=sys.stderr, end="\n" if message else "")
    sys.unraisablehook = lambda unraisable: None
    sys.exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt again
    try:
        main(get_args_parser().parse_args())
    except SplitError as e:
        sys.exit(f"split_data.py: error: {e}")
    except OSError as e:  # the cases above name what to do; this is the last resort
        sys.exit(f"split_data.py: error: {e.strerror or e}: {e.filename}")
    except KeyboardInterrupt:
        message = "interrupted before the split was written; run again (a download resumes)"
        exit_interrupted(f"\nsplit_data.py: {message}")
