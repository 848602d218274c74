"""Flower app running lifelong's AFA servers (see ../README or examples/federated_flower_run.py)."""
