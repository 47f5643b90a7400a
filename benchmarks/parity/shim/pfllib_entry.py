"""Run PFLlib's ``system/main.py`` unchanged, with the parity model and the stand-ins.

Usage: ``python pfllib_entry.py REFERENCE_DIR [main.py flags...]``, from a working
directory whose ``../dataset/<name>/`` holds the exported split. The environment variable
``PARITY_MODEL`` names a JSON file ``{"in_dim": D, "hidden": H, "num_classes": C,
"init": "<path of a torch state dict in PFLlib's names>"}``.

What this changes, and only this: (1) each of ``torchvision``, ``h5py``, ``cvxpy`` and
``calmsize`` that is not installed is replaced by the stand-in in ``standins/`` (see each
file for what it provides); (2) the name ``FedAvgCNN`` in PFLlib's
``flcore.trainmodel.models``, which ``main.py`` calls for ``-m CNN``, builds
:class:`parity_models.ParityMLP` with the given initial weights instead. The reference's
files are not modified; its ``main.py`` then runs as ``__main__`` with the given flags.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _install_standins() -> list[str]:
    used = []
    for name in ("torchvision", "h5py", "cvxpy", "calmsize"):
        if importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(name, HERE / "standins" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        used.append(name)
    return used


def main() -> None:
    reference = Path(sys.argv[1]).resolve()
    system = reference / "system"
    if not (system / "main.py").is_file():
        sys.exit(f"{system / 'main.py'} not found: pass a PFLlib checkout as the first argument")
    sys.path.insert(1, str(system))
    used = _install_standins()
    import torch

    torch.set_num_threads(1)
    from parity_models import ParityMLP

    spec = json.loads(Path(os.environ["PARITY_MODEL"]).read_text())
    state = torch.load(spec["init"])

    def parity_model(*_args: object, **_kwargs: object) -> ParityMLP:
        model = ParityMLP(spec["in_dim"], spec["hidden"], spec["num_classes"])
        model.load_state_dict(state)
        return model

    models = importlib.import_module("flcore.trainmodel.models")
    models.FedAvgCNN = parity_model  # type: ignore[attr-defined]
    print(f"[parity] stand-ins: {', '.join(used) or 'none'}; model: ParityMLP{tuple(spec[k] for k in ('in_dim', 'hidden', 'num_classes'))}",
          flush=True)
    sys.argv = [str(system / "main.py"), *sys.argv[2:]]
    runpy.run_path(str(system / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
