"""Tests of other people's networks (MONAI, nnU-Net) through the framework."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chain_kit
