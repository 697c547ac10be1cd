"""Developer tools: workflow generation and the documentation's images. Not part of the installed package."""
