import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # server_app.py / client_app.py live at the top level
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
