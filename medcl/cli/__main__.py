"""``python -m medcl.cli``: the ``medcl`` command (as ``python -m medcl``)."""

from __future__ import annotations

from medcl.cli import entry_point

if __name__ == "__main__":
    raise SystemExit(entry_point())
