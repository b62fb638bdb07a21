"""The generated gRPC code in loracast/v1 is exactly what grpcio-tools makes of protos/ (never edited by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "loracast/v1/loracast.proto"
GENERATED = ("loracast_pb2.py", "loracast_pb2.pyi", "loracast_pb2_grpc.py")


def test_committed_generated_code_matches_the_proto(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos" / PROTO),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "loracast" / "v1" / name).read_text()
        committed = (ROOT / "loracast" / "v1" / name).read_text()
        assert committed == fresh, f"loracast/v1/{name} is stale or edited by hand: run `make protos`"
