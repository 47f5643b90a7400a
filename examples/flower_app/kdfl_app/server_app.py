"""The kdfl ServerApp; the kdfl config comes from ``kdfl-config`` in the run config."""

from pathlib import Path

from kdfl.flower import make_server_app

app = make_server_app(base_dir=Path(__file__).resolve().parent.parent)
