"""On a CUDA machine: `sniff-chunk` end to end on the GPU and on the CPU, same chunk, compared.

    python -m benchmarks.gpu_chunk            # prints the two manifests' summaries and the largest difference

Checks that the GPU path (lease, pinned copies, background writer, manifest) writes a complete
chunk whose (example_id, position) keys equal the CPU run's and whose vectors agree to 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    base = yaml.safe_load((REPO / "config/config.yaml").read_text())
    out = {}
    with tempfile.TemporaryDirectory(prefix="qk-gpu-chunk-") as d:
        for device in ("cuda", "cpu"):
            cfg = json.loads(json.dumps(base))
            cfg["inference"]["device"] = device
            cfg["output"]["data_root"] = f"{d}/{device}"
            path = Path(d) / f"{device}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            subprocess.run([sys.executable, "-m", "qk_sniffer", "sniff-chunk", "--config", str(path), "--chunk", "0"],
                           check=True, cwd=REPO)
            man = json.loads((Path(d) / device / "staging/chunk-0/manifest.json").read_text())
            print(device, man["device"], "examples", man["examples"], "tokens", man["tokens"], "rows",
                  sum(man["rows"].values()), "timings", man["timings"])
            out[device] = Path(d) / device / "staging/chunk-0"
        worst = 0.0
        for f in sorted(out["cuda"].glob("data/*/*/data.parquet")):
            a = pq.read_table(f).sort_by([("example_id", "ascending"), ("position", "ascending")])
            b = pq.read_table(out["cpu"] / f.relative_to(out["cuda"])).sort_by(
                [("example_id", "ascending"), ("position", "ascending")])
            assert a.select(["example_id", "position", "bucket"]).equals(b.select(["example_id", "position", "bucket"]))
            va = np.stack(a["vector"].to_numpy(zero_copy_only=False))
            vb = np.stack(b["vector"].to_numpy(zero_copy_only=False))
            worst = max(worst, float(np.abs(va - vb).max()))
        print(f"{len(list(out['cuda'].glob('data/*/*/data.parquet')))} configs: same keys; max |gpu - cpu| = {worst:.2e}")
        assert worst < 1e-4
    return 0


if __name__ == "__main__":
    sys.exit(main())
