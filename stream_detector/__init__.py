"""stream-detector: streaming anomaly detection for sales events on Kafka."""

__version__ = "0.1.0"
