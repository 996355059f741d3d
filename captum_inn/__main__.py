"""``python -m captum_inn`` runs the command line (see :mod:`captum_inn.cli`)."""

from captum_inn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
