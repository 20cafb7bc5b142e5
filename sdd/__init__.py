"""sdd: defend open-weight LLMs against malicious fine-tuning, and measure whether the defense holds."""

__version__ = "0.1.0"
