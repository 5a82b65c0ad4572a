"""``python -m jaxcnmf``: the same command line as the ``jaxcnmf`` console script."""

from jaxcnmf.runs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
