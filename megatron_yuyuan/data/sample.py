"""The small MedQuAD sample shipped with the package (CC BY 4.0; see its README.md)."""

from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "medquad_sample"
