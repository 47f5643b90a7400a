"""An in-process Flower Grid for tests (needs flwr), and :func:`single_threaded`."""

from __future__ import annotations

import torch


def single_threaded(fn):
    """``fn()`` with one torch thread, the previous number restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ClientApps train single-threaded; so does the reference
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


class LocalGrid:
    """An in-process Grid: Flower's own Message / RecordDict objects and our ClientApp,
    called the way a SuperNode calls it (one Context per node, kept across rounds), but
    no Ray and no network. The deployment test covers the real transport."""

    def __init__(self, client_app, num_nodes):
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.contexts = {
            i + 1: Context(run_id=1, node_id=i + 1, node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
