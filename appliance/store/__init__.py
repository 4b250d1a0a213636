"""The model store: weights kept once on local disk, verified, and what may be imported into it."""
