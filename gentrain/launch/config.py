"""Where `gentrain.config` lived before the house move (issue 28): kept so scripts that import
`gentrain.launch.config` still work. New code imports `gentrain.config`."""
from gentrain.config import *  # noqa: F401,F403
