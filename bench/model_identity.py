"""Start-up cost of identifying a local model folder for the judge cache: the identity read from
file names, sizes, modification times, config files and safetensors headers, against hashing
every byte of the folder.

    python bench/model_identity.py FOLDER [REPEATS]
"""
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perm.judges import model_identity  # noqa: E402


def every_byte(path: str) -> str:
    digest = hashlib.sha256()
    folder = Path(path)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def timed(fn, folder, repeats):
    started = time.perf_counter()
    for _ in range(repeats):
        fn(folder)
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    folder, repeats = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    print(f"{folder}: {size / 1e6:.0f} MB")
    print(f"every byte:     {timed(every_byte, folder, repeats) * 1000:9.1f} ms")
    print(f"model_identity: {timed(model_identity, folder, repeats) * 1000:9.1f} ms")
