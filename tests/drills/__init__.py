"""The reliability drills' parts (the tests are tests/test_drills_*.py; see RELIABILITY.md).

trainer.py   `python -m diffusax.main` plus a log of the batches the loop takes (and a NaN hook)
helpers.py   starting, watching and killing trainers; reading what they leave on disk
datasets.py  small TFDS datasets of the wrong shape or dtype, built locally
launch.py    runs a command without root's permission override, or with a file-size limit
"""
