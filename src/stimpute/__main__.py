"""`python -m stimpute ...`: the same command line as the `stimpute` console script."""

from stimpute.cli import app

app(prog_name="stimpute")
