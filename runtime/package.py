"""Opening a package: the manifest, its scheduler config and tokenizers, and lazy components."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgediff.errors import PackageError
from edgediff.manifest import Manifest
from edgediff.runtime.sessions import Component, SessionOptions


@dataclass
class Package:
    root: Path
    manifest: Manifest
    scheduler_config: dict

    def component(self, name: str, options: SessionOptions) -> Component:
        entry = self.manifest.components.get(name)
        if entry is None:
            raise PackageError(
                f"{self.root}: the package has no '{name}' component "
                f"(it has: {', '.join(self.manifest.components)})"
            )
        return Component(name, self.root / entry.file, options)


def open_package(path: str | Path) -> Package:
    root = Path(path)
    if not root.exists():
        raise PackageError(f"{root}: no such package folder; create one with `edgediff convert`")
    manifest = Manifest.read(root)
    for name, entry in manifest.components.items():
        for rel in (entry.file, *entry.data_files):
            if not (root / rel).is_file():
                raise PackageError(
                    f"{root}: component '{name}' is incomplete ({rel} is missing); re-run `edgediff convert`"
                )
    sched = root / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(sched.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackageError(f"{sched}: unreadable scheduler config ({exc}); re-run `edgediff convert`") from exc
    return Package(root, manifest, scheduler_config)
