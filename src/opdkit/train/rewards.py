"""Compatibility location: training rewards come from the one grader registry, :mod:`opdkit.runtime.graders`."""

from opdkit.runtime.graders import REWARD_CHOICES as REWARDS  # noqa: F401
from opdkit.runtime.graders import reward_fn as get_reward  # noqa: F401
