"""subgroup_robustness: who pays when a language model is compressed?"""

from subgroup_robustness.utils.env import quiet_third_party

quiet_third_party()

__version__ = "0.1.0"
