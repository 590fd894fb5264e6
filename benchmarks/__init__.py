import os
from pathlib import Path

# The shared datasets sit beside the clone (../shared/datasets); $AUTOSEG_DATASETS points elsewhere.
DATA_ROOT = Path(os.environ.get("AUTOSEG_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
