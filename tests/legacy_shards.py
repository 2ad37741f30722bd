"""Shards in format 1, as metalm wrote them before format 2, for the tests that check it is still read."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np


def to_format_1(shards_dir: Path) -> Path:
    """Rewrite a prepared directory in shard format 1, as metalm wrote it before format 2 (``__meta__.json``
    first, then one 1-D sample per member; manifest version 1): the loader still reads such directories."""
    man = json.loads((shards_dir / "manifest.json").read_text())
    for split in ("train", "val"):
        for i, rec in enumerate(man["splits"][split]["shards"]):
            path = shards_dir / rec["path"]
            with tarfile.open(path) as tar:
                rows = [row for m in tar.getmembers() for row in np.load(io.BytesIO(tar.extractfile(m).read()))]
            meta = {k: man[k] for k in ("format", "seq_len", "sample_len", "dtype", "vocab_size", "tokenizer_hash")}
            meta.update(version=1, split=split, shard=i, samples=len(rows))
            members = [("__meta__.json", json.dumps(meta, sort_keys=True).encode())]
            for k, row in enumerate(rows):
                b = io.BytesIO()
                np.save(b, row)
                members.append((f"{k:06d}.npy", b.getvalue()))
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            path.write_bytes(buf.getvalue())
            rec["bytes"], rec["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    man["version"] = 1
    man.pop("samples_per_member")
    (shards_dir / "manifest.json").write_text(json.dumps(man))
    return shards_dir
