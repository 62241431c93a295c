"""Experiment configs: common.py builds the sections, one file per experiment (see
realm_jax/config.py for loading them)."""
