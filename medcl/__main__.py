"""``python -m medcl``: the ``medcl`` command (what ``torchrun -m medcl run ...`` starts)."""

from __future__ import annotations

from medcl.cli import entry_point

if __name__ == "__main__":
    raise SystemExit(entry_point())
