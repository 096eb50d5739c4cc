"""A checkpoint directory is data, never code. Every pickle in it is read against an allow-list before any library
unpickles it (torch's weights-only check for torch.save files, DCP's byte items included; a restricted unpickler
for DCP's metadata), and every file is checked against the size and SHA-256 recorded when it was written."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from dist_tune.errors import UserError

# Globals beyond torch's weights-only defaults that honest checkpoints hold: DeepSpeed's loss scaler, ZeRO stage
# and (ZeRO-1/2) parameter-slice addresses in its optimizer files, NumPy's RNG state in rng_rank*.pt of checkpoints
# written before it was tensors.
TORCH_FILE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.dtype", "numpy.ndarray",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.dtypes.UInt32DType"})
# What DCP's .metadata pickles: its own metadata classes, torch sizes and dtypes, and the storage layout.
DCP_METADATA_GLOBALS = frozenset({
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")})
DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
DIGESTS_PREFIX = ".digests-rank"
CHUNK = 2**24


class UnsafeCheckpoint(UserError):
    pass


def refuse(file: Path, what: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"checkpoint file {file} {what}, which dist_tune refuses to load (a checkpoint is data, "
                            "never code); use a checkpoint written by dist_tune, or train.resume=none")


# --- pickles ----------------------------------------------------------------------------------------------
def torch_file_globals(source) -> set[str]:
    """Globals of a torch.save file (path or bytes stream) that weights-only loading would refuse, unpickling
    nothing."""
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(source))


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module == DCP_METADATA_MODULE or dtype or (module, name) in DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def dcp_metadata(file: Path):
    """DCP's .metadata, read by an unpickler that builds only DCP's metadata classes, sizes and dtypes."""
    try:
        with open(file, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise refuse(file, f"holds the global '{exc}'") from None
    except (EOFError, ValueError, TypeError, AttributeError) as exc:
        raise refuse(file, f"is not a DCP metadata file ({type(exc).__name__})") from None


def dcp_byte_items(directory: Path, metadata) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) of each non-tensor item DCP stores as a torch.save blob (loaded by DCP with pickle)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_fqns = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn in byte_fqns:
            with open(directory / info.relative_path, "rb") as handle:
                handle.seek(info.offset)
                yield f"{info.relative_path} (item '{index.fqn}')", handle.read(info.length)


def check_torch_file(file: Path, source=None, where: str | None = None) -> None:
    if source is None and not zipfile.is_zipfile(file):
        raise refuse(file, "is not a torch.save zip archive (a legacy pickle can run code)")
    unsafe = sorted(torch_file_globals(source or file) - TORCH_FILE_GLOBALS)
    if unsafe:
        raise refuse(Path(where) if where else file, f"holds the global '{unsafe[0]}'")


def check_pickles(checkpoint: Path) -> None:
    """Raise UnsafeCheckpoint, naming the file and the global, for any pickle in `checkpoint` that could run code
    when loaded: torch.save files (*.pt, DeepSpeed's states), DCP's .metadata and the byte items it points at."""
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        if file.suffix in (".pt", ".pth", ".bin"):
            check_torch_file(file)
        elif file.name == ".metadata":
            for where, blob in dcp_byte_items(file.parent, dcp_metadata(file)):
                check_torch_file(file, io.BytesIO(blob), where=str(file.parent / where))


# --- integrity --------------------------------------------------------------------------------------------
def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def recorded_files(checkpoint: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Paths of the checkpoint's files relative to it, sorted (the digest files and `exclude` left out)."""
    names = (p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    return sorted(n for n in names if not Path(n).name.startswith(DIGESTS_PREFIX) and n not in exclude)


def digests(checkpoint: Path, names: list[str]) -> dict[str, list]:
    """{name: [bytes, sha256]} of the named files."""
    return {name: [(checkpoint / name).stat().st_size, sha256(checkpoint / name)] for name in names}


def write_share(checkpoint: Path, rank: int, world_size: int, exclude: tuple[str, ...]) -> None:
    """This rank's share of the digests (every world_size-th file), for rank 0 to merge."""
    share = recorded_files(checkpoint, exclude)[rank::world_size]
    (checkpoint / f"{DIGESTS_PREFIX}{rank}.json").write_text(json.dumps(digests(checkpoint, share)))


def merge_shares(checkpoint: Path) -> dict[str, list]:
    merged: dict[str, list] = {}
    for share in sorted(checkpoint.glob(f"{DIGESTS_PREFIX}*.json")):
        merged.update(json.loads(share.read_text()))
        share.unlink()
    return merged


def read_record(marker: Path) -> dict[str, list] | None:
    """The file record of a COMPLETE marker; None for markers written before records were kept."""
    try:
        return json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return None


def problem(checkpoint: Path, name: str, size: int, digest: str, hashed: bool) -> str | None:
    """What is wrong with one recorded file, or None."""
    file = checkpoint / name
    if not file.is_file():
        return f"file {file} is missing"
    if file.stat().st_size != size:
        return f"file {file} has {file.stat().st_size} bytes where {size} were written (truncated or changed)"
    if hashed and sha256(file) != digest:
        return f"file {file} changed since it was written (SHA-256 differs)"
    return None


def verify_share(checkpoint: Path, record: dict[str, list], rank: int = 0, world_size: int = 1) -> str | None:
    """The first problem among the recorded files: sizes of all, SHA-256 of this rank's share."""
    for i, (name, (size, digest)) in enumerate(sorted(record.items())):
        found = problem(checkpoint, name, size, digest, hashed=i % world_size == rank)
        if found:
            return found
    return None


def integrity_error(checkpoint: Path, found: str) -> UserError:
    return UserError(f"checkpoint {checkpoint}: {found}; resume from another checkpoint (train.resume=PATH), or set "
                     "checkpoint.verify=false to load it anyway")
