"""Stand-in for ``torchvision`` (no CPU build is installed here): PFLlib's ``main.py``
imports it for ``-m ResNet18/ResNet34/GoogleNet`` only, which the parity runs never select.
Any use fails clearly."""


def __getattr__(name: str) -> object:
    raise ImportError(f"torchvision is not installed (torchvision.{name} was used); "
                      "the parity harness runs PFLlib with its own model only")
