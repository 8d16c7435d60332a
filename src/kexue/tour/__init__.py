"""The tour: one section per capability, each stating a claim and measuring it.

``kexue tour [SECTION...] --out DIR`` writes ``DIR/report.html``, ``DIR/results.json`` and
the figures as PNG files.
"""

from kexue.tour.report import Claim, Figure, Section, Table
from kexue.tour.runner import SECTIONS, SectionContext, run_tour

__all__ = ["SECTIONS", "Claim", "Figure", "Section", "SectionContext", "Table", "run_tour"]
