"""`edge tune`: the fastest configuration this device runs within a quality budget."""

from edge.tune.profile import DeviceProfile, apply_profile, find_profile
from edge.tune.search import TuneOptions, TuneResult, tune
from edge.tune.space import Candidate

__all__ = ["Candidate", "DeviceProfile", "TuneOptions", "TuneResult", "apply_profile", "find_profile", "tune"]
