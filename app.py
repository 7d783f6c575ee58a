"""Launch the REED comparison app (the Hugging Face Space's app_file).

The host and port come from GRADIO_SERVER_NAME (default 127.0.0.1, so only this machine can connect)
and GRADIO_SERVER_PORT (default 7860). A Hugging Face Space must listen on 0.0.0.0.

NOTE: Gradio Spaces are expected to set GRADIO_SERVER_NAME=0.0.0.0 themselves, which has not been
checked on a live Space. If the Space shows no app, add that variable in the Space settings.
"""

import logging
import os

from demo.ui import build_demo, launch_options

demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        **launch_options(),
    )
