"""Reduced-size copies of the training images, for the fast data path (``--image_store DIR``).

Decoding a JPEG is mostly Huffman decoding, whose cost follows the file's size, not the
output's: PIL's reduced-size (DCT-domain) decoding of an ImageNet photo at 1/2 scale
still costs ~80% of the full decode, and that floor is most of a worker's time at low B.
A copy of the image at 1/2 (1/4) resolution, saved as a high-quality JPEG, is a third
(a tenth) of the bytes and decodes 2.5x (6.5x) faster than the original does at that
scale.  The fast path reads a copy when the crop drawn for a sample, mapped into the
copy, still covers at least B pixels per side, which is exactly the condition under
which it already decodes the original at reduced scale; the crop itself is drawn from
the original's size, so the augmentation draws and their statistics do not change.  Only
the image content differs, by the copy's JPEG re-encoding (measured in
tests/test_image_store.py and TRAINING.md).

Layout: ``DIR/store.json`` (the manifest, written last: a store without it is incomplete)
and ``DIR/<k>/<path relative to the training folder>`` for every level k.  A copy is the
original converted to RGB and box-averaged by k (PIL ``Image.reduce``): copy pixel m
covers the original's pixels [m*k, (m+1)*k), the same geometry as libjpeg's scaled
decoding, so crop boxes map by plain division.  Build with scripts/build_image_store.py.
Each copy carries the byte size of its original (``source_tag``, a JPEG comment).  A copy
that is missing, of the wrong size or tag, cut short or undecodable is not used: the
original is decoded instead, so a damaged store costs speed, never correctness.
"""
import hashlib
import json
import multiprocessing
import os
import tempfile
from typing import Dict, Optional, Sequence, Tuple

from PIL import Image

from utils import file_mode

__all__ = ['StoreError', 'FORMAT', 'VERSION', 'MANIFEST', 'DEFAULT_LEVELS', 'DEFAULT_QUALITY', 'SUBSAMPLING', 'reduced_size',
           'file_list_digest', 'reduce_image', 'ImageStore', 'StoredCopies']

FORMAT = 'efficienttrain-image-store'
VERSION = 1
MANIFEST = 'store.json'
TMP_DIR = '.tmp'  # the builder's temporary files (removed when a build starts)
DEFAULT_LEVELS = (2, 4)
# quality 95 with full-resolution chroma: the copies stay within 1 dB (PSNR, mean over the
# ImageNet samples) of decoding the original at reduced scale, measured against the
# published pipeline; 4:2:0 or quality 90 are 25-45% smaller and 1.5-2.5 dB further.
DEFAULT_QUALITY = 95
SUBSAMPLING = {'4:4:4': 0, '4:2:2': 1, '4:2:0': 2}


class StoreError(Exception):
    """A store that cannot be used with this training folder; the message names the fix."""


def reduced_size(size: Tuple[int, int], k: int) -> Tuple[int, int]:
    """Size of a level-k copy of an image of `size`: Image.reduce rounds up (last pixel partial)."""
    return (size[0] + k - 1) // k, (size[1] + k - 1) // k


def file_list_digest(relpaths: Sequence[str]) -> str:
    """Identifies the training file list a store was built from (order-independent)."""
    h = hashlib.sha1()
    for p in sorted(relpaths):
        h.update(p.replace(os.sep, '/').encode('utf-8', 'surrogateescape'))
        h.update(b'\n')
    return h.hexdigest()


def source_tag(src_bytes: int) -> bytes:
    """The JPEG comment a copy carries: the byte size of the original it was made from.

    Read with the copy's header (PIL's info['comment']), so a copy of an original that was
    since replaced (re-encoded, or another dataset under the same names) is not used.  The
    size, not the modification time: copying a dataset to another disk keeps sizes.
    """
    return f'{FORMAT} source-bytes={int(src_bytes)}'.encode()


def reduce_image(img: Image.Image, k: int) -> Image.Image:
    """The level-k copy's pixels: RGB (what the training loader converts to), box-averaged by k."""
    return img.convert('RGB').reduce(k)


def check_levels(levels) -> Tuple[int, ...]:
    levels = tuple(sorted({int(k) for k in levels}))
    if not levels or any(k not in (2, 4, 8) for k in levels):
        raise ValueError(f'store levels must be among 2, 4, 8 (the JPEG decoder\'s scales), got {levels}')
    return levels


class StoredCopies:
    """The reduced copies of one training image; attached to its (unloaded) PIL image."""

    __slots__ = ('store', 'relpath', 'src_bytes')

    def __init__(self, store: 'ImageStore', relpath: str, src_bytes: int):
        self.store, self.relpath, self.src_bytes = store, relpath, src_bytes

    def open(self, scale: int, full_size: Tuple[int, int]) -> Tuple[Optional[Image.Image], int]:
        """(the largest copy whose level k divides `scale`, k), or (None, 1) when none can be used.

        scale: the reduction the crop allows (a power of two).  The copy must have the size
        a level-k copy of `full_size` has and carry the original's source tag; anything
        else (missing, unreadable, stale) is not used and counts as a miss.  Only the
        header is read here: the caller loads the pixels and calls `miss()` if that fails.
        """
        if self.relpath in self.store.unreadable:  # the build could not read it: no copies
            return None, 1
        for k in reversed(self.store.levels):
            if k > scale or scale % k:
                continue
            try:
                img = Image.open(self.store.path(k, self.relpath))
            except OSError:  # missing or not an image: the original is decoded instead
                self.miss()
                continue
            if img.size == reduced_size(full_size, k) and img.info.get('comment') == source_tag(self.src_bytes):
                return img, k
            img.close()
            self.miss()
        return None, 1

    def miss(self) -> None:
        self.store.count_miss()


class ImageStore:
    """A built store, checked against the training folder it is used with."""

    def __init__(self, root: str, manifest: dict):
        self.root = root
        self.levels = check_levels(manifest['levels'])
        self.manifest = manifest
        self.unreadable = set(manifest.get('unreadable', ()))
        # copies that should have been there but were missing, unreadable or stale,
        # summed over the loader's worker processes (which inherit it)
        self.misses = multiprocessing.Value('q', 0)

    def count_miss(self) -> None:
        with self.misses.get_lock():
            self.misses.value += 1

    def path(self, k: int, relpath: str) -> str:
        return os.path.join(self.root, str(k), relpath)

    def copies(self, relpath: str, src_bytes: int) -> StoredCopies:
        return StoredCopies(self, relpath, src_bytes)

    @staticmethod
    def read_manifest(root: str) -> Optional[dict]:
        try:
            with open(os.path.join(root, MANIFEST), encoding='utf-8') as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    @classmethod
    def open(cls, root: str, folder_root: str, relpaths: Sequence[str]) -> 'ImageStore':
        """The store at `root`, which must have been built from exactly `relpaths` (StoreError otherwise)."""
        rebuild = f'python scripts/build_image_store.py --data_path {folder_root} --out {root}'
        if not os.path.isdir(root):
            raise StoreError(f'--image_store {root} is not a directory: build the store with {rebuild}')
        try:
            manifest = cls.read_manifest(root)
        except (OSError, ValueError) as e:
            raise StoreError(f'--image_store {root}: {MANIFEST} is unreadable ({e}): rebuild with {rebuild}') from None
        if manifest is not None and not isinstance(manifest, dict):
            raise StoreError(f'--image_store {root}: {MANIFEST} is not a store manifest: rebuild with {rebuild}')
        if manifest is None:
            raise StoreError(f'--image_store {root} has no {MANIFEST} (not a store, or its build did not finish): '
                             f'run {rebuild}')
        if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
            raise StoreError(f'--image_store {root} is not a version-{VERSION} {FORMAT} '
                             f'(found {manifest.get("format")} v{manifest.get("version")}): rebuild with {rebuild}')
        if manifest.get('digest') != file_list_digest(relpaths):
            raise StoreError(f'--image_store {root} was built from another file list ({manifest.get("images")} '
                             f'images from {manifest.get("source")}; the training folder {folder_root} has '
                             f'{len(relpaths)}): rebuild with {rebuild}')
        try:
            return cls(root, manifest)
        except (KeyError, ValueError) as e:
            raise StoreError(f'--image_store {root}: bad {MANIFEST} ({e}): rebuild with {rebuild}') from None


def write_copies(src: str, relpath: str, out_root: str, levels: Sequence[int], quality: int,
                 subsampling: str) -> Dict[str, object]:
    """Write the level copies of one image (atomically: a temporary file in OUT/.tmp, then a rename).

    Copies already present with the right size are kept, so an interrupted build resumes.
    Returns {'written': n, 'kept': n, 'bytes': {k: size}, 'error': message or None}.
    """
    out = {'written': 0, 'kept': 0, 'bytes': {}, 'error': None}
    try:
        tag = source_tag(os.path.getsize(src))
        with Image.open(src) as original:
            size = original.size
            todo = []
            for k in levels:
                dst = os.path.join(out_root, str(k), relpath)
                try:
                    with Image.open(dst) as done:
                        if done.size == reduced_size(size, k) and done.info.get('comment') == tag:
                            done.load()  # a copy cut short (a crash before the data reached the disk) is redone
                            out['kept'] += 1
                            out['bytes'][k] = os.path.getsize(dst)
                            continue
                except OSError:
                    pass
                todo.append((k, dst))
            if not todo:
                return out
            original.load()
            rgb = original.convert('RGB')
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        out['error'] = f'{type(e).__name__}: {str(e)[:120]}'
        return out
    for k, dst in todo:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # one folder for every temporary file, so a killed build leaves nothing among the copies
        fd, tmp = tempfile.mkstemp(suffix='.jpg', dir=os.path.join(out_root, TMP_DIR))
        try:
            os.fchmod(fd, file_mode())  # mkstemp's 0600 would hide the store from other users
            with os.fdopen(fd, 'wb') as f:
                reduce_image(rgb, k).save(f, 'JPEG', quality=quality, subsampling=SUBSAMPLING[subsampling],
                                          comment=tag)
                # on disk before the rename, so a crash cannot leave a named but empty
                # copy behind a complete manifest (~1 ms per copy; a whole-system sync
                # at the end instead could wait on every other writer of the machine)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        out['written'] += 1
        out['bytes'][k] = os.path.getsize(dst)
    return out
