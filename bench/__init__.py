"""Load tests of cortex against a direct connection, nginx and peer gateways.

Run with ``python -m bench`` (see ``bench/README.md``). Every figure is a ratio
against a baseline measured in the same run, in interleaved rounds.
"""
