"""A Flower app running kdfl (see README.md)."""
