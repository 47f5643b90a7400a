"""kdfl on Flower: the only package that imports ``flwr`` (install ``kdfl[flower]``).

Any kdfl algorithm runs unchanged: its client half in a Flower ``ClientApp``
(:mod:`kdfl.flower.client_app`), its server half in a ``ServerApp``
(:mod:`kdfl.flower.server_app`), both built from one kdfl config. Payloads travel as
``ArrayRecord`` (native dtypes: fp16 / int8 logits as they are) plus ``MetricRecord`` /
``ConfigRecord``. See ``examples/flower_app/`` for ``flwr run`` in simulation and on the
deployment engine.

    from kdfl.flower import make_client_app, make_server_app, simulate
    hist = simulate("configs/fedema_distill.toml", ["run.rounds=2"])  # flwr run on a simulation SuperLink

``[privacy]`` applies as in the simulator; ``kdfl-secagg = true`` (or ``simulate(...,
secagg=True)``) aggregates mean-aggregated algorithms with Flower's SecAgg+
(:mod:`kdfl.flower.secagg`).
"""

from __future__ import annotations

from kdfl.flower.client_app import make_client_app
from kdfl.flower.federation import load_config
from kdfl.flower.records import nbytes, payload_to_record, record_to_payload
from kdfl.flower.secagg import SecAggSettings
from kdfl.flower.server_app import make_server_app
from kdfl.flower.simulation import simulate, simulate_clients

__all__ = [
    "SecAggSettings", "load_config", "make_client_app", "make_server_app", "nbytes", "payload_to_record",
    "record_to_payload", "simulate", "simulate_clients",
]
