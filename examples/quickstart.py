"""kdfl from Python: FedAvg and FedEMA-Distill on digits, side by side, in about a minute.

    python examples/quickstart.py
"""

from kdfl import config, experiment

COMMON = [
    "data.name=digits", "data.num_clients=20", "data.proxy=holdout", "data.proxy_size=300",
    "partition.name=dirichlet", "partition.alpha=0.5", "model.arch=mlp",
    "local.epochs=2", "local.lr=0.05", "local.momentum=0.9", "run.rounds=10", "run.threads=1",
]

for name, extra in {
    "FedAvg": ["algorithm.name=fedavg"],
    "FedEMA-Distill (trimmed mean, int8 logits)": ["algorithm.name=fedema_distill", "compression.uplink=int8"],
}.items():
    cfg = config.load(None, COMMON + extra)  # the same validation as `kdfl run`
    summary = experiment.run(cfg).summary
    print(f"{name:38s} accuracy {summary['final_accuracy']:.3f}  ECE {summary['final_ece']:.3f}  "
          f"uplink {summary['uplink_bytes_per_client_round'] / 1e3:.1f} kB/client/round")
