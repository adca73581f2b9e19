"""Real tools the test extra installs inside the virtual environment, found where their wheels put them."""

import sys
from pathlib import Path

SITE_PACKAGES = (
    Path(sys.executable).parents[1]
    / "lib"
    / f"python{sys.version_info.major}.{sys.version_info.minor}"
    / "site-packages"
)
COMPOSE = SITE_PACKAGES / "compose" / "docker-compose"
