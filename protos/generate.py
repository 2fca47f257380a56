"""Generate the protobuf and gRPC Python code from protos/ into pathways_lite/v1/.

Run by `make` (through `python protos/generate.py`) and by the wheel build (setup.py's
build_py). The output is ignored by git and never edited by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT
PACKAGE_DIR = OUT_ROOT / "pathways_lite" / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "pathways_lite" / "v1").glob("*.proto"))


def is_fresh() -> bool:
    """True when every generated module is newer than its .proto source."""
    for proto in proto_files():
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            out = PACKAGE_DIR / f"{proto.stem}{suffix}"
            if not out.exists() or out.stat().st_mtime < proto.stat().st_mtime:
                return False
    return (PACKAGE_DIR / "__init__.py").exists()


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc  # imported here: only the build needs grpcio-tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    PACKAGE_DIR.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {files}")
    (PACKAGE_DIR / "__init__.py").write_text(
        '"""Generated protobuf code for pathways_lite.v1 (from protos/; do not edit)."""\n'
    )


if __name__ == "__main__":
    if "--if-stale" in sys.argv and is_fresh():
        sys.exit(0)
    generate()
