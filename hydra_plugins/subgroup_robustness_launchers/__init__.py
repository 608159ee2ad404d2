"""Hydra finds launchers in the ``hydra_plugins`` namespace only: the project's launchers, registered here
(see subgroup_robustness/launchers.py for what they do)."""
