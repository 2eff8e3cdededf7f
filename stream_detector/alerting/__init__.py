"""What happens to an anomaly after the pipeline called it one: calendar and promotion windows
that suppress or annotate alerts, and analysts' feedback that silences a known false pattern.

The detectors never see any of this: models keep learning inside windows and after feedback;
only what is published changes.
"""
