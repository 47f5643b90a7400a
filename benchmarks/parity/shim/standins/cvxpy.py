"""Stand-in for ``cvxpy`` (not installed here): imported by PFLlib's ``main.py`` through
``serverpac`` (FedPAC only, which the parity runs never select). Any use fails clearly."""


def __getattr__(name: str) -> object:
    raise ImportError(f"cvxpy is not installed (cvxpy.{name} was used): FedPAC needs the real package")
