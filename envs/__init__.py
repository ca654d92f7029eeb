"""N2N environments, model description and surgery. Never imports ``pipeline``."""
