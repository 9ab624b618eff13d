"""ftservice: fine-tune open LLMs for a domain on Ray, and close the loop with people."""

__version__ = "0.1.0"
