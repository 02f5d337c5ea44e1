"""The local web demo (tools/web_demo.py): model session and request handling without any UI
library, and the Gradio page on top (``app``), so that the handlers are tested without a browser."""
