"""prefect.yaml's pull step: where a worker finds the project's code when a run starts.

The checkout is $ITUNING_HOME on the worker's machine, read at run time; without it, the checkout
this package was installed from (`pip install -e .`). `prefect deploy` therefore records no path of
the machine it ran on.
"""

import os
from pathlib import Path

INSTALLED_CHECKOUT = Path(__file__).resolve().parent.parent


def enter_checkout() -> dict[str, str]:
    """Make the checkout the working directory of the flow run; returns it as `directory`."""
    directory = Path(os.environ.get("ITUNING_HOME") or INSTALLED_CHECKOUT).expanduser().resolve()
    if not (directory / "flows").is_dir():
        raise FileNotFoundError(f"{directory} holds no ituning checkout (no flows/ folder); set ITUNING_HOME "
                                "on the worker's machine to the folder prefect.yaml is in")
    os.chdir(directory)
    return {"directory": str(directory)}
