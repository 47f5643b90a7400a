"""Coverage-guided fuzzing of kdfl's parsers with atheris (libFuzzer for Python).

    python fuzz/run.py TARGET [libFuzzer flags]      # TARGET: wire, codecs, config, datasets

``make fuzz`` builds the seed corpora (``fuzz/make_corpus.py``: valid encodings, the
shipped configs, small archives) and runs every target for ``FUZZ_TIME`` seconds. Only
kdfl's own modules are instrumented (not torch or numpy). A crash (an exception other
than the documented PayloadError / KdflError, or one without a reason) stops the run and
leaves ``crash-*`` with the input; reproduce it with ``python fuzz/run.py TARGET crash-...``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).parent))

with atheris.instrument_imports(include=["kdfl", "_targets"]):
    import _targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in _targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(_targets.TARGETS)}}} [corpus dir] [libFuzzer flags]")
    logging.disable(logging.CRITICAL)  # the config loader warns on some inputs
    target = _targets.TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
