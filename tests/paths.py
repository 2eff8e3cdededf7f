"""Where the repository's files are, for tests that read them (README, config/, compose)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
